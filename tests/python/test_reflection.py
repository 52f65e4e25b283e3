"""gRPC server reflection through grpcio's own client (reflection v1alpha).

Usage: test_reflection.py HOST:PORT
Lists the services, then resolves grok.v1.Inference and its Generate method's messages from the
descriptors the server returns. Exits non-zero on any failure.
"""

import sys

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main(addr: str) -> None:
    with grpc.insecure_channel(addr) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        for want in ("grok.v1.Inference", "grok.v1.Admin", "grpc.health.v1.Health"):
            assert want in services, f"{want} not listed: {sorted(services)}"
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("grok.v1.Inference")
        gen = svc.FindMethodByName("Generate")
        assert gen.input_type.full_name == "grok.v1.GenerateRequest", gen.input_type.full_name
        assert gen.output_type.full_name == "grok.v1.GenerateResponse", gen.output_type.full_name
        fields = {f.name for f in gen.input_type.fields}
        assert {"max_tokens", "temperature", "seed"} <= fields, fields
    print("reflection v1alpha ok:", sorted(services))


if __name__ == "__main__":
    main(sys.argv[1])
