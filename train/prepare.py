"""Put the training corpus at data/tinyshakespeare.txt and verify it (`make data`).

    python -m train.prepare                      # from ../shared/data if present, else download
    python -m train.prepare --url http://...     # another source of the same file (verified by md5)

Exit codes: 0 ok, 2 the file does not verify, 3 download failed.
"""

from __future__ import annotations

from pathlib import Path

from charrnn.cli import parser
from charrnn.data import CORPUS_URL, fetch_corpus, verify_corpus
from charrnn.errors import UserError, cli

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "data" / "tinyshakespeare.txt"
DEFAULT_SHARED = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m train.prepare", __doc__)
    p.add_argument("--dest", default=str(DEFAULT_DEST), help="where to put the corpus")
    p.add_argument("--shared", default=str(DEFAULT_SHARED), help="copy from here when it exists")
    p.add_argument("--url", default=CORPUS_URL, help="download from here otherwise")
    p.add_argument("--force", action="store_true", help="fetch again even if dest verifies")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    if dest.exists() and not args.force:
        try:
            verify_corpus(dest)
            print(f"data: {dest} already present and verified")
            return 0
        except UserError:
            print(f"data: {dest} does not verify; fetching again")
    source = fetch_corpus(dest, shared=args.shared, url=args.url)
    print(f"data: {dest} from {source} (verified)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
