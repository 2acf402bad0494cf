//! Why an approval operation failed, whichever store keeps the approvals (the journal of one
//! proxy, or the fleet's Redis).

use tollgate_core::approval::{DecideError, RedeemError};

use super::MAX_APPROVALS;

/// Why an approval operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no approval with this id")]
    Unknown,
    #[error(transparent)]
    Decide(#[from] DecideError),
    #[error(transparent)]
    Redeem(#[from] RedeemError),
    #[error("too many approvals are open ({MAX_APPROVALS})")]
    Full,
    #[error("the approvals journal cannot be written: {0}")]
    Io(#[from] std::io::Error),
}
