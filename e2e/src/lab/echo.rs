//! The pods' server: answers every TCP connection, and every UDP datagram, on its ports with
//! one line, `<pod name> <client address>`, so a test sees which pod it reached and whether
//! the client's address survived the path.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};

/// What the server writes to a client at `peer`.
pub fn answer(pod: &str, peer: SocketAddr) -> String {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_canonical(),
        v4 => v4,
    };
    format!("{pod} {ip}\n")
}

/// Serves on `[::]:port` (IPv4 and IPv6, TCP and UDP) until the process is killed.
pub fn serve(pod: &str, ports: &[u16]) -> std::io::Result<()> {
    let mut threads = Vec::new();
    for &port in ports {
        let udp = UdpSocket::bind(("::", port))?;
        let name = pod.to_string();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(answer(&name, peer).as_bytes(), peer);
            }
        }));
        let listener = TcpListener::bind(("::", port))?;
        let pod = pod.to_string();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if let Ok(peer) = conn.peer_addr() {
                    let _ = conn.write_all(answer(&pod, peer).as_bytes());
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_the_pod_and_the_plain_client_address() {
        assert_eq!(
            answer("n1-p0", "[::ffff:192.0.2.100]:5000".parse().unwrap()),
            "n1-p0 192.0.2.100\n"
        );
        assert_eq!(
            answer("n1-p0", "[2001:db8::100]:5000".parse().unwrap()),
            "n1-p0 2001:db8::100\n"
        );
    }
}
