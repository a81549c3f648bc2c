//! The host service that folds the guest memory of many VMM processes
//! (issue 15): its wire protocol and the socket that carries it. Sits above
//! `dedup`; nothing below imports it.

pub mod socket;
pub mod wire;
