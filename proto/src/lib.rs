//! grok-proto: the gRPC wire types and services of grok-cluster, generated at build time from
//! `proto/*.proto` with a pure-Rust protobuf compiler (no system protoc), and [`telemetry`]:
//! the binaries' logs and OpenTelemetry spans, whose context travels in the wire messages, and
//! [`tls`]: mutual TLS between the coordinator and the workers, [`auth`]: the client APIs'
//! bearer token, [`process`]: the start-up and shutdown every long-running binary shares, and
//! [`convert`]: wire messages to the shared library's types and back.

pub mod auth;
pub mod convert;
pub mod limits;
pub mod membership;
pub mod process;
pub mod telemetry;
pub mod tls;

pub mod v1 {
    tonic::include_proto!("grok.v1");
}

/// The encoded `FileDescriptorSet` of `grok.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/grok_descriptor.bin"));
