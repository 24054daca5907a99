//! A process started in a namespace, and where the workspace's binaries are.

use std::process::Child;

use super::sh;

/// A process started in a namespace. Dropping it kills it.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    pub log: std::path::PathBuf,
}

impl Proc {
    /// Takes charge of `child`, whose output goes to `log`.
    pub(super) fn new(child: Child, name: &str, log: &std::path::Path) -> Proc {
        Proc {
            child: Some(child),
            name: name.to_owned(),
            log: log.to_owned(),
        }
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // `ip netns exec` execs the program, so the pid is the program's.
        sh(&["kill", "-TERM", &child.id().to_string()]);
        for _ in 0..300 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // What it still holds open says what it waits for (a drain).
        let pid = child.id().to_string();
        let sockets = std::process::Command::new("nsenter")
            .args(["-t", &pid, "-n", "ss", "-tanpi"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(nsenter: {e})"));
        let _ = child.kill();
        panic!(
            "{} did not exit within 15s of SIGTERM; TCP sockets in its namespace:\n{sockets}\nlog: {}",
            self.name,
            self.log_text()
        );
    }

    /// Sends SIGKILL and reaps the process (a crash: it says goodbye to
    /// no one). The handle is empty afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A workspace binary built in the same profile as the running executable
/// (next to it, or one level up for test executables in `deps/`).
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let here = exe.parent().expect("exe dir");
    let candidates = [
        here.join(name),
        here.parent().map(|d| d.join(name)).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built next to {}: run `cargo build --bins` first",
                exe.display()
            )
        })
}
