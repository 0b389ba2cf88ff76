//! Sends announcement frames on an interface (pnet's AF_PACKET channel, cached per
//! interface); a narrow sink so tests can record frames instead.

use std::collections::HashMap;
use std::sync::Mutex;

use pnet_datalink::DataLinkSender;

pub trait FrameSink: Send + Sync {
    /// Sends `frame` on the interface `interface` with index `index`.
    fn send(&self, interface: &str, index: u32, frame: &[u8]) -> std::io::Result<()>;
}

/// Channels are cached by interface name and index: an interface deleted and made again
/// (a VLAN or a bridge rebuilt) has a new index, and a channel bound to the old one fails
/// with ENXIO, so a new index opens a new channel. A send error drops the channel too; the
/// next round opens it again.
#[derive(Default)]
pub struct Pnet {
    senders: Mutex<HashMap<String, Channel>>,
}

/// A cached sender and the interface index it is bound to.
type Channel = (u32, Box<dyn DataLinkSender>);

impl FrameSink for Pnet {
    fn send(&self, interface: &str, index: u32, frame: &[u8]) -> std::io::Result<()> {
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        if senders.get(interface).is_none_or(|(i, _)| *i != index) {
            senders.remove(interface);
            let iface = pnet_datalink::interfaces()
                .into_iter()
                .find(|i| i.name == interface && i.index == index)
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no interface {interface} with index {index}"),
                    )
                })?;
            // A small receive buffer: this channel only sends.
            let config = pnet_datalink::Config {
                read_buffer_size: 256,
                ..Default::default()
            };
            match pnet_datalink::channel(&iface, config)? {
                pnet_datalink::Channel::Ethernet(tx, _rx) => {
                    senders.insert(interface.to_string(), (index, tx));
                }
                _ => return Err(std::io::Error::other("not an Ethernet channel")),
            }
        }
        let (_, tx) = senders.get_mut(interface).expect("inserted above");
        let sent = match tx.send_to(frame, None) {
            Some(r) => r,
            None => Err(std::io::Error::other(
                "the frame did not fit the send buffer",
            )),
        };
        if sent.is_err() {
            senders.remove(interface);
        }
        sent
    }
}
