//! The C ABI. The only place with `unsafe`; every export runs inside one panic boundary.
//!
//! Conventions (see `include/fleetprov.h`): handle first, then inputs, then outputs; output
//! parameters are written only on success; strings are NUL-terminated UTF-8, checked; memory the
//! library allocates is released with the library's `_free` functions; `_free(NULL)` is a no-op.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

mod alloc;
mod handles;
mod host;
mod inject;
mod types;

pub use alloc::WipingAllocator;
pub use handles::*;
pub use host::*;
pub use types::*;
