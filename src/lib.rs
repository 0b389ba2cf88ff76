//! l2speaker: floating IPs for Kubernetes LoadBalancer Services on L2 networks.
//!
//! - [`config`]: flags and their environment twins;
//! - [`pool`]: the `IPPool` resource and the validated address set;
//! - [`service`]: what the speaker reads from a Service;
//! - [`allocator`]: which Service gets which IP (pure);
//! - [`lease`]: compare-and-swap Leases and expiry by local observation;
//! - [`plan`]: eligibility, ranking and endpoints (pure);
//! - [`election`]: one task per VIP, from candidate to owner and back;
//! - [`dataplane`]: addresses, announcements and DNAT on this node;
//! - [`cluster`]: the reflectors;
//! - [`metrics`]: Prometheus metrics, health and readiness;
//! - [`speaker`]: wires it all together and shuts it down cleanly;
//! - [`status`], [`drill`], [`svg`]: the operator's commands and their timeline picture.

pub mod allocator;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod drill;
pub mod election;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod pool;
pub mod service;
pub mod speaker;
pub mod status;
pub mod svg;
