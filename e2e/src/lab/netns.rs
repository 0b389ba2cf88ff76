//! Network namespaces: create and delete them, run `ip` inside them, enter them from a
//! thread, and start processes in them.
//!
//! Every `ip` call goes through [`ip`], which always passes `-n <namespace>`: the lab cannot
//! touch the root namespace by accident.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("running `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("entering network namespace {ns}: {source}")]
    Enter { ns: String, source: std::io::Error },
}

/// Where `ip netns add` puts a namespace.
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

fn run(cmd: &mut Command) -> Result<String, NetnsError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(spawn_error(&shown))?;
    stdout_of(shown, out)
}

fn spawn_error(cmd: &str) -> impl Fn(std::io::Error) -> NetnsError + '_ {
    move |source| NetnsError::Spawn {
        cmd: cmd.to_string(),
        source,
    }
}

/// The output of a finished command, or its stderr as the error.
fn stdout_of(cmd: String, out: std::process::Output) -> Result<String, NetnsError> {
    if !out.status.success() {
        return Err(NetnsError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn add(ns: &str) -> Result<(), NetnsError> {
    run(Command::new("ip").args(["netns", "add", ns])).map(drop)
}

pub fn delete(ns: &str) -> Result<(), NetnsError> {
    run(Command::new("ip").args(["netns", "delete", ns])).map(drop)
}

/// Every namespace name under /run/netns.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A veth pair: `name` in `ns`, its peer `eth0` in `peer_ns`, both up.
pub fn veth(ns: &str, name: &str, peer_ns: &str) -> Result<(), NetnsError> {
    ip(
        ns,
        &[
            "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", peer_ns,
        ],
    )?;
    ip(ns, &["link", "set", name, "up"])?;
    ip(peer_ns, &["link", "set", "eth0", "up"])?;
    Ok(())
}

/// `ip -n <ns> ARGS…`.
pub fn ip(ns: &str, args: &[&str]) -> Result<String, NetnsError> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Runs `f` on a new thread that has entered `ns`; sockets it opens live in `ns`.
pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    Ok(enter_thread(ns, f)?.join())
}

/// A thread running inside a network namespace.
pub struct InNs<T>(std::thread::JoinHandle<Option<T>>);

impl<T> InNs<T> {
    /// Waits for the thread; a panic in it is re-raised here.
    pub fn join(self) -> T {
        self.0
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
            .expect("the thread entered its namespace before running")
    }

    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// Starts a thread that enters `ns`, then runs `f`.
pub fn enter_thread<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<InNs<T>, NetnsError> {
    let file = File::open(path(ns)).map_err(|source| NetnsError::Enter {
        ns: ns.into(),
        source,
    })?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            // SAFETY: setns affects this thread only; the fd is open for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(std::io::Error::last_os_error()));
                return None;
            }
            let _ = tx.send(Ok(()));
            Some(f())
        })
        .map_err(|source| NetnsError::Enter {
            ns: ns.into(),
            source,
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(InNs(handle)),
        Ok(Err(source)) => Err(NetnsError::Enter {
            ns: ns.into(),
            source,
        }),
        Err(_) => Err(NetnsError::Enter {
            ns: ns.into(),
            source: std::io::Error::other("thread died before entering"),
        }),
    }
}

/// Writes a sysctl inside `ns` (`key` as a /proc/sys path: `net/ipv4/ip_forward`).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let (k, v) = (key.to_string(), value.to_string());
    run_in(ns, move || std::fs::write(format!("/proc/sys/{k}"), v))?.map_err(|source| {
        NetnsError::Enter {
            ns: ns.into(),
            source: std::io::Error::new(source.kind(), format!("sysctl {key}={value}: {source}")),
        }
    })
}

/// A command that will run inside `ns` and die with the thread that spawned it
/// (PR_SET_PDEATHSIG), so a killed test leaves no process behind.
pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, NetnsError> {
    let file = File::open(path(ns)).map_err(|source| NetnsError::Enter {
        ns: ns.into(),
        source,
    })?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (prctl, setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs a command to completion inside `ns` (e.g. `nft -f -` with `input`).
pub fn exec(
    ns: &str,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, NetnsError> {
    use std::io::Write;
    let mut cmd = command_in(ns, program)?;
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let shown = format!("{program} {} (in {ns})", args.join(" "));
    let mut child = cmd.spawn().map_err(spawn_error(&shown))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(text.as_bytes())
            .map_err(spawn_error(&shown))?;
    }
    let out = child.wait_with_output().map_err(spawn_error(&shown))?;
    stdout_of(shown, out)
}
