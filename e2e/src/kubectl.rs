//! Runs the real `kubectl` against a server, the way a user would, and reports what it said.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

/// What one kubectl call printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout, or a panic that shows the whole call when it failed.
    #[track_caller]
    pub fn ok(self) -> String {
        assert!(
            self.success,
            "kubectl failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    /// stderr of a call that must fail.
    #[track_caller]
    pub fn err(self) -> String {
        assert!(
            !self.success,
            "kubectl should have failed but printed:\n{}",
            self.stdout
        );
        self.stderr
    }
}

/// kubectl with its own kubeconfig and discovery cache (so calls never share state).
pub struct Kubectl {
    dir: tempfile::TempDir,
}

impl Kubectl {
    /// Fails with a clear message when no kubectl is installed.
    pub fn new(server_url: &str) -> std::io::Result<Self> {
        if which("kubectl").is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "kubectl is not on PATH: install it (the README's set-up does) before running these tests",
            ));
        }
        let dir = tempfile::Builder::new().prefix("l2s-kubectl-").tempdir()?;
        std::fs::write(
            dir.path().join("kubeconfig"),
            crate::apiserver::kubeconfig(server_url),
        )?;
        std::fs::create_dir(dir.path().join("cache"))?;
        Ok(Kubectl { dir })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The base command: `kubectl --kubeconfig … --cache-dir …`.
    pub fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("kubectl");
        c.arg("--kubeconfig").arg(self.kubeconfig());
        c.arg("--cache-dir").arg(self.dir.path().join("cache"));
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// Runs `kubectl ARGS…`.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None).await
    }

    /// Runs `kubectl ARGS…` with `stdin` piped in (for `-f -`).
    pub async fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = self.command();
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        if stdin.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().expect("kubectl starts");
        if let Some(input) = stdin {
            let mut si = child.stdin.take().expect("piped");
            si.write_all(input.as_bytes())
                .await
                .expect("kubectl reads its input");
        }
        let out = child.wait_with_output().await.expect("kubectl runs");
        Output {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}
