//! A throwaway Redis Cluster (three masters, no replicas) built from `redis-server` and
//! `redis-cli` on spare ports, for running the ephemeral suite against cluster routing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOWTO: &str =
    "the Redis Cluster test needs redis-server and redis-cli: apt-get install redis-server";

pub(crate) struct LocalCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A slot half-moved between two masters ([`LocalCluster::begin_moving`]).
pub(crate) struct SlotMove {
    slot: String,
    to_id: String,
}

/// A port that is free, and whose cluster bus port (+10000) is free too.
fn spare_port() -> u16 {
    loop {
        let port = 20_000 + (rand::random::<u16>() % 20_000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

impl LocalCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let port = spare_port();
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    // How long a silent master takes to count as failed (`lose_a_master`).
                    "--cluster-node-timeout",
                    "5000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start redis-server: {e}\n{HOWTO}"));
            children.push(child);
            ports.push(port);
        }
        let cluster = Self {
            ports,
            children,
            _dir: dir,
        };
        for &p in &cluster.ports {
            cluster.wait_for(p, "PING", "PONG");
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}\n{HOWTO}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for &p in &cluster.ports {
            cluster.wait_for(p, "CLUSTER INFO", "cluster_state:ok");
        }
        cluster
    }

    /// Kills the last master (no replica takes over) and waits until the others see the
    /// cluster fail (`cluster-node-timeout`).
    pub fn lose_a_master(&mut self) {
        if let Some(mut last) = self.children.pop() {
            let _ = last.kill();
            let _ = last.wait();
        }
        self.wait_for(self.ports[0], "CLUSTER INFO", "cluster_state:fail");
    }

    /// Moves `key` (a Redis key as stored) to another master the way a resharding does, and
    /// leaves its slot half-moved (the old owner `MIGRATING`, the new one `IMPORTING`: the old
    /// owner answers `ASK` for the key). [`Self::finish_move`] ends it.
    pub fn begin_moving(&self, key: &str) -> SlotMove {
        let slot = self.cli(self.ports[0], &["CLUSTER", "KEYSLOT", key]);
        let owner = |p: u16| !self.cli(p, &["GET", key]).starts_with("MOVED");
        let from = *self
            .ports
            .iter()
            .find(|&&p| owner(p))
            .expect("the key's owner");
        let to = *self.ports.iter().find(|&&p| p != from).unwrap();
        let id = |p: u16| self.cli(p, &["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from), id(to));
        self.cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        self.cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        let moved = self.cli(
            from,
            &["MIGRATE", "127.0.0.1", &to.to_string(), key, "0", "5000"],
        );
        assert_eq!(moved, "OK", "MIGRATE");
        SlotMove { slot, to_id }
    }

    /// Gives the slot of `m` to its new owner on every node.
    pub fn finish_move(&self, m: &SlotMove) {
        for &p in &self.ports {
            self.cli(p, &["CLUSTER", "SETSLOT", &m.slot, "NODE", &m.to_id]);
        }
    }

    /// One redis-cli command on `port`; its answer, trimmed.
    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}\n{HOWTO}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `command` through redis-cli on `port` until its answer contains `want`.
    fn wait_for(&self, port: u16, command: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(command.split(' '))
                .output()
                .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}\n{HOWTO}"));
            if String::from_utf8_lossy(&out.stdout).contains(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {port}: `{command}` never answered {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
