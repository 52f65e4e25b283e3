//! grok-proto: the gRPC wire types and services of grok-cluster, generated at build time from
//! `proto/*.proto` with a pure-Rust protobuf compiler (no system protoc).

pub mod v1 {
    tonic::include_proto!("grok.v1");
}
