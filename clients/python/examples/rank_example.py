"""Rank a few products for a query with the Python SDK: `python rank_example.py --url http://127.0.0.1:8000`."""

import argparse

from rankserve_client import RankerClient, RankerError

PRODUCTS = [
    ("sku-101", "Oakhurst Turquoise Velvet Pillows Accent Pillow | Accent Pillows"),
    ("sku-102", "Larkin Gray Pillows Accent Pillow | Accent Pillows"),
    ("sku-103", "Ashby Turquoise Area Rug | Area Rugs | pairs well with turquoise pillows"),
    ("sku-104", "Millwood Oak Dining Table | Dining Tables"),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--query", default="turquoise pillows")
    args = parser.parse_args()
    try:
        with RankerClient(args.url) as client:
            for r in client.rank(args.query, PRODUCTS, top_k=3):
                print(f"{r.rank}. {r.id}  {r.score:+.3f}  {r.text}")
    except RankerError as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
