//! l2speaker: floating IPs for Kubernetes LoadBalancer Services on L2 networks.
//!
//! - [`pool`]: the `IPPool` resource and the validated address set;
//! - [`service`]: what the speaker reads from a Service;
//! - [`allocator`]: which Service gets which IP (pure);
pub mod allocator;
pub mod dataplane;
pub mod lease;
pub mod pool;
pub mod service;
