//! Test namespaces made with `ip netns add` and deleted on drop, even when the
//! test fails. They have no route to the outside: only loopback is brought up.

use std::process::{Command, Output};

/// A named network namespace under `/run/netns`, removed on drop.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates `ip netns add <unique name>` and brings `lo` up in it.
    pub fn new(prefix: &str) -> Self {
        let name = crate::unique(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = TestNetns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `argv` inside the namespace and returns its output, whatever the status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        c.output().expect("spawn ip netns exec")
    }

    /// Runs `argv` inside the namespace and panics with its stderr unless it succeeds.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{:?} in {} failed: {}",
            argv,
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // What still runs inside (a proxy its endpoint left for the next
        // start to adopt) would keep the namespace alive.
        examples::namespace::kill_processes_in(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ok(c: &mut Command) {
    let out = c.output().expect("spawn");
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
