//! Sends announcement frames on an interface (pnet's AF_PACKET channel, cached per
//! interface); a narrow sink so tests can record frames instead.

use std::collections::HashMap;
use std::sync::Mutex;

use pnet_datalink::{Channel, DataLinkSender};

pub trait FrameSink: Send + Sync {
    fn send(&self, interface: &str, frame: &[u8]) -> std::io::Result<()>;
}

#[derive(Default)]
pub struct Pnet {
    senders: Mutex<HashMap<String, Box<dyn DataLinkSender>>>,
}

impl FrameSink for Pnet {
    fn send(&self, interface: &str, frame: &[u8]) -> std::io::Result<()> {
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        if !senders.contains_key(interface) {
            let iface = pnet_datalink::interfaces()
                .into_iter()
                .find(|i| i.name == interface)
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no interface {interface}"),
                    )
                })?;
            // A small receive buffer: this channel only sends.
            let config = pnet_datalink::Config {
                read_buffer_size: 256,
                ..Default::default()
            };
            match pnet_datalink::channel(&iface, config)? {
                Channel::Ethernet(tx, _rx) => {
                    senders.insert(interface.to_string(), tx);
                }
                _ => return Err(std::io::Error::other("not an Ethernet channel")),
            }
        }
        let tx = senders.get_mut(interface).expect("inserted above");
        match tx.send_to(frame, None) {
            Some(r) => r,
            None => Err(std::io::Error::other(
                "the frame did not fit the send buffer",
            )),
        }
    }
}

impl Pnet {
    /// Forgets an interface's channel (after an error: the interface may have changed).
    pub fn forget(&self, interface: &str) {
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(interface);
    }
}
