"""Generates the gateway's Python stubs from proto/ with grpcio-tools.

    python clients/python/generate.py

writes clients/python/gen/spike/gateway/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py (gitignored:
they are derived from proto/, and regenerating them on every run means they can never lag
behind it). consumer.py puts gen/ on sys.path. The well-known types (Timestamp, Duration,
Struct) come from the protobuf package, so only the gateway's own files are generated.
"""

import pathlib
import shutil
import sys
from importlib import resources

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"
OUT = HERE / "gen"


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    # grpcio-tools ships google/protobuf/*.proto, which the gateway's files import.
    well_known = resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{well_known}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            *protos,
        ]
    )
    if status != 0:
        print(f"protoc failed (exit {status})", file=sys.stderr)
        return 1
    print(f"generated {len(protos)} files' stubs into {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
