//! provline's integration tests: one binary, modules by topic.

mod cases;
mod common;
mod crash;
mod own_ca;
mod pipeline;
mod sandbox_cli;
mod sandbox_sdk;
mod scale;
