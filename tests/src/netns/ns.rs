//! One network namespace: checked commands, processes and async tasks
//! that live in it, and its `/etc/hosts`.

use std::fs::File;
use std::future::Future;
use std::process::{Command, Output, Stdio};

use super::{sh, Proc};

/// A network namespace.
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// `ip netns exec NAME args...`, checked.
    pub fn sh(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command to run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Starts a process in the namespace; it is killed when the handle drops.
    pub fn spawn(&self, program: &str, args: &[&str], log: &std::path::Path) -> Proc {
        self.spawn_under(&[], program, args, log)
    }

    /// [`Ns::spawn`] under `prefix`: a command that execs the rest, run
    /// before `ip netns exec` (which mounts a `/sys` of the namespace's own,
    /// without the cgroup file systems).
    pub fn spawn_under(
        &self,
        prefix: &[&str],
        program: &str,
        args: &[&str],
        log: &std::path::Path,
    ) -> Proc {
        let log_file = File::create(log).unwrap();
        let mut cmd = match prefix {
            [first, rest @ ..] => {
                let mut cmd = Command::new(first);
                cmd.args(rest)
                    .args(["ip", "netns", "exec", &self.name, program]);
                cmd
            }
            [] => self.command(program),
        };
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Proc::new(child, program, log)
    }

    /// Runs `make()`'s future on a thread that lives in this namespace, so
    /// every socket it opens belongs to the namespace.
    pub fn block_on<F, Fut, T>(&self, make: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(make())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs `make()`'s future on a thread in this namespace, then keeps
    /// that thread's runtime (and what the future spawned, such as a
    /// server's accept loop) alive until the returned handle is dropped.
    pub fn spawn_task<F, Fut>(&self, make: F) -> NsTask
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let path = format!("/run/netns/{}", self.name);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                make().await;
                let _ = ready_tx.send(());
                let _ = stopped.await;
            });
        });
        ready_rx.recv().expect("task thread started");
        NsTask {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The `/etc/hosts` programs started in this namespace see (`ip netns
    /// exec` bind-mounts `/etc/netns/NAME/hosts` over `/etc/hosts`).
    /// Rewrites in place, so running programs see the change too.
    pub fn set_hosts(&self, lines: &str) {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        let content = format!("127.0.0.1 localhost\n{lines}\n");
        std::fs::write(dir.join("hosts"), content).unwrap();
    }
}

/// A task running in a namespace's thread; stopped when dropped.
pub struct NsTask {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for NsTask {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
