"""``python -m e3rl.engine.build_kernels [--isa all|avx512,avx2,generic]``: compile the native
CPU kernels into torch's extension cache ahead of time (default: this CPU's instruction set),
so that a process started later needs no compiler and no write access to the cache (the
container image runs it with ``--isa all``; see deploy/Dockerfile)."""

from __future__ import annotations

import argparse
import logging
import sys

from .kernels import ISA_FLAGS, cpu_isa, prebuild


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e3rl.engine.build_kernels",
                                     description="Compile e3rl's native CPU kernels into torch's "
                                     "extension cache ($TORCH_EXTENSIONS_DIR) ahead of time, "
                                     "so that later processes load them without a compiler "
                                     "or write access to the cache.")
    parser.add_argument("--isa", default=None, help="'all' or a comma-separated subset of "
                        f"{', '.join(ISA_FLAGS)} (default: this CPU's, {cpu_isa()})")
    args = parser.parse_args(argv)
    isas = (list(ISA_FLAGS) if args.isa == "all" else
            [cpu_isa()] if args.isa is None else [i.strip() for i in args.isa.split(",")])
    unknown = [isa for isa in isas if isa not in ISA_FLAGS]
    if unknown:
        parser.error(f"unknown instruction set(s) {', '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prebuild(isas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
