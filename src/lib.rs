//! l2speaker: floating IPs for Kubernetes LoadBalancer Services on L2 networks.
//!
//! - [`config`]: flags and their environment twins;
//! - [`context`]: what the speaker's loops share;
//! - [`pool`]: the `IPPool` resource and the validated address set;
//! - [`service`]: what the speaker reads from a Service;
//! - [`allocator`]: which Service gets which IP (pure);
//! - [`lease`]: compare-and-swap Leases and expiry by local observation;
//! - [`plan`]: eligibility, ranking and endpoints (pure);
//! - [`ownership`]: the Lease holder as a pure state machine, its timing rule and its shell;
//! - [`coordinator`]: per VIP, eligibility, rank and the Lease, fed to the holders;
//! - [`allocation`], [`lease_gc`]: the elected allocator's loop and Lease clean-up;
//! - [`announce`]: the announcement burst's schedule;
//! - [`claims`]: other hosts claiming a VIP this node owns (reported, defended);
//! - [`events`]: Kubernetes Events, posted in the background with a deadline;
//! - [`node_ips`]: node-IP mode, k3s ServiceLB's way: which nodes publish which Service (pure);
//! - [`node_lease`]: what a node's speaker publishes about the node (addresses it refuses);
//! - [`dataplane`]: addresses, announcements and DNAT on this node;
//! - [`cluster`]: the reflectors;
//! - [`metrics`]: Prometheus metrics, health and readiness;
//! - [`speaker`]: wires it all together, keeps DNAT in step, and shuts down within bounds;
//! - [`status`], [`drill`], [`svg`]: the operator's commands and their timeline picture.

pub mod allocation;
pub mod allocator;
pub mod announce;
pub mod claims;
pub mod cluster;
pub mod config;
pub mod context;
pub mod coordinator;
pub mod dataplane;
pub mod drill;
pub mod events;
pub mod keeper;
pub mod lease;
pub mod lease_gc;
pub mod liveness;
pub mod memory;
pub mod metrics;
pub mod node_ips;
pub mod node_lease;
pub mod ownership;
pub mod plan;
pub mod pool;
pub mod service;
pub mod speaker;
pub mod status;
pub mod svg;
