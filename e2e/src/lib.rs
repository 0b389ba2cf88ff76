//! The test substrate of l2speaker:
//!
//! - [`apiserver`]: a Kubernetes API server subset, good enough for kubectl and kube-rs;
//! - [`kubectl`]: the real kubectl, run as a user would;
//! - [`lab`]: hosts, nodes, pods and a client in network namespaces on the real kernel.

pub mod apiserver;
pub mod kubectl;
pub mod lab;
pub mod sim;
pub mod testbed;
