"""`python -m emopipe.bench NAME [options]`: each benchmark times a stage's core against a plain
reference measured in the same run and prints the ratio."""

import importlib
import sys

BENCHMARKS = ("resize", "ocr", "splits", "train", "scale")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m emopipe.bench {{{'|'.join(BENCHMARKS)}}} [options]  (NAME --help for options)")
        return 2
    return importlib.import_module(f"emopipe.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
