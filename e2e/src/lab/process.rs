//! Processes the lab starts inside its namespaces: spawned from one long-lived thread (so
//! PR_SET_PDEATHSIG ties them to the lab, not to whichever thread asked), logged to files,
//! stopped by pid.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::sync::mpsc;

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The thread every lab process is forked from.
pub struct Spawner {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawner {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("lab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the lab's spawner thread");
        Spawner {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("live until drop")
            .send((cmd, reply_tx))
            .map_err(|_| std::io::Error::other("the lab's spawner thread is gone"))?;
        reply_rx
            .recv()
            .map_err(|_| std::io::Error::other("the lab's spawner thread is gone"))?
    }
}

impl Default for Spawner {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process running in the lab.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub log: PathBuf,
    child: Mutex<Child>,
}

impl Proc {
    pub(crate) fn new(name: String, host: String, log: PathBuf, child: Child) -> Self {
        Proc {
            name,
            host,
            pid: child.id(),
            log,
            child: Mutex::new(child),
        }
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_running(&self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Sends `sig` to this process (by its pid, and only while it is our unreaped child).
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> nix::Result<()> {
        if !self.is_running() {
            return Err(nix::errno::Errno::ESRCH);
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig)
    }

    /// SIGKILL and reap: the fault "the process died".
    pub fn kill(&self) {
        let mut c = self.child();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Waits for the process to exit on its own, up to `timeout`.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child().try_wait() {
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// What the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
