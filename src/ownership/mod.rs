//! Who answers for which IP: one Lease holder per VIP (and one for the allocator).
//!
//! - [`machine`]: the holder as a pure state machine (state × input × now → state, actions);
//! - [`gate_health`]: when a node whose kernel gate cannot be shown to work gives up;
//! - [`timing`]: the rule tying address lifetimes to the Lease timings, checked at start-up;
//!
//! All of it is pure: the async loop that feeds a holder and carries out its actions is
//! [`crate::holder`].
//!
//! The deterministic simulator (`e2e/src/sim`) runs the same machine against a simulated
//! API server, kernels and LAN under randomized faults.

pub mod gate_health;
pub mod machine;
pub mod node;
pub mod quorum;
pub mod timing;
