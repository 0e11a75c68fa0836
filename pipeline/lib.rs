//! provline: provision IoT devices into AWS IoT Core straight off the factory line.
//!
//! The bulk pipeline, stage by stage: [`ingest`] → [`keygen`] → persist
//! ([`workspace`]) → [`stage`] → [`register`] → [`reconcile`] → [`bundle`] →
//! report ([`run`]). The [`ledger`] records every step so that a crash at any
//! point is followed by `provline resume`, not by a second certificate.

pub mod approve;
pub mod aws;
pub mod bundle;
pub mod ca;
pub mod ca_aws;
pub mod cli;
pub mod crypto;
pub mod csr;
pub mod error;
pub mod failpoint;
pub mod ingest;
pub mod keygen;
pub mod keystore;
pub mod ledger;
pub mod lint;
pub mod preflight;
pub mod profile;
pub mod reconcile;
pub mod register;
pub mod reports;
pub mod rules;
pub mod run;
pub mod sandbox_setup;
pub mod stage;
pub mod template;
pub mod verify;
pub mod workspace;
