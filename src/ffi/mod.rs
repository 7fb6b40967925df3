//! The C ABI. The only place with `unsafe`; every export runs inside one panic boundary.
//!
//! Conventions (see `include/fleetprov.h`): handle first, then inputs, then outputs; output
//! parameters are written only on success; strings are NUL-terminated UTF-8, checked; memory the
//! library allocates is released with the library's `_free` functions; `_free(NULL)` is a no-op.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

// One file per handle (cancel, client, config, error, host, operation, provision, the result
// objects, storage), the shared types and the panic boundary in types.rs.
mod cancel;
mod client;
mod config;
mod error;
mod host;
mod operation;
mod provision;
mod results;
mod storage;
mod types;

mod alloc;
mod inject;
pub(crate) mod os;

pub use alloc::WipingAllocator;
pub use cancel::*;
pub use client::*;
pub use config::*;
pub use error::*;
pub use host::*;
pub use operation::*;
pub use provision::*;
pub use results::*;
pub use storage::*;
pub use types::*;
