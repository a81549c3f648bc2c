//! The host service that folds the guest memory of many VMM processes, and
//! the client with which a VMM process puts its memory under it.
//!
//! - `wire`: the messages, their encoding and every check on decoding;
//! - `socket`: framed messages with descriptors over a Unix socket;
//! - `control`: the window word a client and the service share;
//! - `mapper`: the service's side of one process (the dedup engine's
//!   remote-mapper port over the socket);
//! - `server`: [`Service`], domains, admission, connections;
//! - `client`: [`ServiceClient`] and its remap thread.
//!
//! Sits above `dedup`; nothing below imports it.

pub mod client;
mod control;
pub mod error;
mod mapper;
mod remap;
pub mod server;
pub mod socket;
pub mod wire;

pub use client::{ClientOptions, MappedRegion, ServiceClient};
pub use error::ServiceError;
pub use server::{Service, ServiceOptions, ServiceStats};
