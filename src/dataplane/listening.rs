//! The sockets listening on this node (its network namespace): TCP listeners and bound UDP
//! sockets, read from procfs (`/proc/net/{tcp,tcp6,udp,udp6}`) with the `procfs` crate.
//! Node-IP mode never DNATs a port something on the node itself serves (ssh, the kubelet).

use std::net::IpAddr;

use crate::service::Protocol;

/// Every TCP listener and UDP socket: protocol, local address, port.
pub fn sockets() -> Result<Vec<(Protocol, IpAddr, u16)>, procfs::ProcError> {
    let mut out = Vec::new();
    for tcp in [procfs::net::tcp()?, procfs::net::tcp6()?] {
        out.extend(
            tcp.iter()
                .filter(|e| e.state == procfs::net::TcpState::Listen)
                .map(|e| (Protocol::Tcp, e.local_address.ip(), e.local_address.port())),
        );
    }
    for udp in [procfs::net::udp()?, procfs::net::udp6()?] {
        out.extend(
            udp.iter()
                .map(|e| (Protocol::Udp, e.local_address.ip(), e.local_address.port())),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// A listener opened here is found (in whatever namespace the test runs).
    #[test]
    fn a_tcp_listener_and_a_udp_socket_are_found() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let all = super::sockets().unwrap();
        let (t, u) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
        assert!(all.contains(&(super::Protocol::Tcp, t.ip(), t.port())));
        assert!(all.contains(&(super::Protocol::Udp, u.ip(), u.port())));
    }
}
