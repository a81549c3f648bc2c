//! What can go wrong between a VMM process and the host service, one type
//! for both ends.

use crate::{
    dedup::DedupError, frames::FrameError, memory::MemoryError, userfault::UserfaultError,
};

use super::wire::WireError;

/// Errors of the host service and of its client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A message could not be read, decoded or sent.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The OS refused something the service or client needed.
    #[error("{op}: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest memory handed over or described is not what the protocol
    /// asks for (`what` says which check failed).
    #[error("guest memory refused: {what}")]
    BadMemory {
        /// The failed check.
        what: String,
    },
    /// The peer sent a message this side did not expect now.
    #[error("protocol: expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// The message kind that came.
        got: &'static str,
    },
    /// The service refused the client and said why.
    #[error("the service refused: {text} (code {code})")]
    Refused {
        /// The service's code.
        code: u32,
        /// Its explanation.
        text: String,
    },
    /// The peer closed the connection.
    #[error("the other side closed the connection")]
    Closed,
    /// The peer's credentials are not allowed to use this service.
    #[error("process {pid} (uid {uid}) may not use this service")]
    NotAllowed {
        /// The peer's process id.
        pid: i32,
        /// The peer's user id.
        uid: u32,
    },
    /// The frame store failed.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// Guest memory could not be built over the handed-over memfd.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The dedup engine failed.
    #[error(transparent)]
    Dedup(#[from] DedupError),
    /// Write protection failed.
    #[error(transparent)]
    Userfault(#[from] UserfaultError),
}

impl ServiceError {
    /// The code an `Error` message carries for this error.
    pub(crate) fn code(&self) -> u32 {
        match self {
            ServiceError::Wire(_) | ServiceError::Unexpected { .. } => 1,
            ServiceError::BadMemory { .. } | ServiceError::Memory(_) | ServiceError::Frames(_) => 2,
            ServiceError::NotAllowed { .. } => 3,
            _ => 4,
        }
    }
}
