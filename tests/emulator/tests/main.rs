//! Integration tests of the emulator over real TLS on loopback.

mod common;
mod provisioning;
