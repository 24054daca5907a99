//! The runner's command line and what it turns into: a [`Plan`] (how long
//! and how wide each workload runs) and the [`Workload`]s to run.

use std::fmt;
use std::str::FromStr;

use clap::Parser;
use serde::Serialize;

/// Benchmark runner: every workload through the tunnel and over a direct
/// routed TCP path, on the network-namespace topology of the end-to-end
/// tests. Needs root and `cargo build --release --bins` (or the debug
/// binaries, when run from a debug build).
#[derive(Parser, Debug)]
#[command(name = "benches")]
pub struct Cli {
    /// Shorter runs and fewer connections (smoke test).
    #[arg(long)]
    pub quick: bool,
    /// Where the raw results go (JSON).
    #[arg(long, value_name = "PATH", default_value = "target/bench-results.json")]
    pub json: String,
    /// Also write the Markdown table here.
    #[arg(long, value_name = "PATH")]
    pub results: Option<String>,
    /// Connections per connection-rate run (default 2,000; quick 256). At
    /// most 10,000: each run leaves its client ports in TIME_WAIT for 60 s,
    /// and once most of the range is taken connect() spends milliseconds
    /// searching it (20,000 per run took the direct path from 34,000 to
    /// 400 conn/s).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(64..=10_000))]
    pub conns: Option<u64>,
    /// Connections in the concurrent-echo workload (default 1,000; quick 200).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub fanout_conns: Option<u64>,
    /// Simulated agents in the fleet workload (default 10,000; quick 500).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub fleet_agents: Option<u64>,
    /// Short connections in the soak (default 100,000; quick 3,000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub soak_short: Option<u64>,
    /// Long connections held through the soak (default 1,000; quick 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=5_000))]
    pub soak_long: Option<u64>,
    /// Times the agent flaps during the soak (default 4; quick 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=100))]
    pub soak_flaps: Option<u64>,
    /// Run only these workloads (comma-separated): bulk, ping-pong,
    /// conn-rate, echo, transports, fleet, soak, attacks.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub only: Vec<Workload>,
    /// Be a reference forwarder instead (the runner starts two of these):
    /// relay each LISTEN address to its TARGET.
    #[arg(long, value_name = "LISTEN=TARGET[,...]", exclusive = true)]
    pub forward: Option<String>,
}

impl Cli {
    /// The quick or full plan, with the counts the flags override.
    pub fn plan(&self) -> Plan {
        let mut plan = if self.quick { QUICK } else { FULL };
        if let Some(n) = self.conns {
            plan.conns = n as usize;
        }
        if let Some(n) = self.fanout_conns {
            plan.fanout_conns = n as usize;
        }
        if let Some(n) = self.fleet_agents {
            plan.fleet_agents = n as usize;
        }
        if let Some(n) = self.soak_short {
            plan.soak_short = n as usize;
        }
        if let Some(n) = self.soak_long {
            plan.soak_long = n as usize;
        }
        if let Some(n) = self.soak_flaps {
            plan.soak_flaps = n as usize;
        }
        plan
    }

    /// Whether `w` runs: all do unless `--only` names some.
    pub fn runs(&self, w: Workload) -> bool {
        self.only.is_empty() || self.only.contains(&w)
    }

    /// The command line that reproduces this run, for the report.
    pub fn command(&self) -> String {
        let mut command =
            "cargo build --release --bins && cargo run --release -p benches --".to_owned();
        if self.quick {
            command.push_str(" --quick");
        }
        if !self.only.is_empty() {
            let only: Vec<&str> = self.only.iter().map(|w| w.name()).collect();
            command.push_str(&format!(" --only {}", only.join(",")));
        }
        for (flag, n) in [
            ("--conns", self.conns),
            ("--fanout-conns", self.fanout_conns),
            ("--fleet-agents", self.fleet_agents),
            ("--soak-short", self.soak_short),
            ("--soak-long", self.soak_long),
            ("--soak-flaps", self.soak_flaps),
        ] {
            if let Some(n) = n {
                command.push_str(&format!(" {flag} {n}"));
            }
        }
        command
    }
}

/// How long and how wide each workload runs.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub bulk_secs: f64,
    pub ping_pongs: usize,
    pub conns: usize,
    pub fanout_conns: usize,
    pub hol_secs: f64,
    pub hol_pings: usize,
    pub fleet_agents: usize,
    pub fleet_idle_secs: u64,
    pub soak_short: usize,
    pub soak_long: usize,
    pub soak_flaps: usize,
    /// How long the floods and the hostile agent go on (seconds).
    pub attack_secs: u64,
    pub army_streams: usize,
    pub army_hold_secs: u64,
    /// Idle CONNECT tunnels to one node (quick mode lowers the limit too).
    pub exhaust_streams: usize,
    /// Idle connections to the CONNECT port of a server limited to 1,024 fds.
    pub fd_sockets: usize,
}

const FULL: Plan = Plan {
    bulk_secs: 10.0,
    ping_pongs: 20_000,
    conns: 2_000,
    fanout_conns: 1_000,
    hol_secs: 20.0,
    hol_pings: 1_000,
    fleet_agents: 10_000,
    fleet_idle_secs: 30,
    soak_short: 100_000,
    soak_long: 1_000,
    soak_flaps: 4,
    attack_secs: 10,
    army_streams: 1_200,
    army_hold_secs: 30,
    exhaust_streams: 8_190,
    fd_sockets: 2_000,
};

const QUICK: Plan = Plan {
    bulk_secs: 2.0,
    ping_pongs: 2_000,
    conns: 256,
    fanout_conns: 200,
    hol_secs: 6.0,
    hol_pings: 200,
    fleet_agents: 500,
    fleet_idle_secs: 5,
    soak_short: 3_000,
    soak_long: 100,
    soak_flaps: 3,
    attack_secs: 3,
    army_streams: 200,
    army_hold_secs: 5,
    exhaust_streams: 510,
    fd_sockets: 1_200,
};

/// Workload groups `--only` can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    Bulk,
    PingPong,
    ConnRate,
    Echo,
    Transports,
    Fleet,
    Soak,
    Attacks,
}

impl Workload {
    pub const ALL: [Workload; 8] = [
        Workload::Bulk,
        Workload::PingPong,
        Workload::ConnRate,
        Workload::Echo,
        Workload::Transports,
        Workload::Fleet,
        Workload::Soak,
        Workload::Attacks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::PingPong => "ping-pong",
            Workload::ConnRate => "conn-rate",
            Workload::Echo => "echo",
            Workload::Transports => "transports",
            Workload::Fleet => "fleet",
            Workload::Soak => "soak",
            Workload::Attacks => "attacks",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Workload, String> {
        let s = s.trim();
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload {s:?}; known: {}", known.join(","))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("benches").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_the_full_plan_with_every_workload() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.json, "target/bench-results.json");
        assert_eq!(cli.plan().fanout_conns, 1_000);
        assert!(Workload::ALL.iter().all(|&w| cli.runs(w)));
        assert_eq!(
            cli.command(),
            "cargo build --release --bins && cargo run --release -p benches --"
        );
    }

    #[test]
    fn the_ci_command_line_parses() {
        let cli = parse(&["--quick", "--json", "target/bench-quick.json"]).unwrap();
        assert!(cli.quick);
        assert_eq!(cli.json, "target/bench-quick.json");
        assert_eq!(cli.plan().ping_pongs, 2_000);
    }

    #[test]
    fn counts_override_the_plan_within_bounds() {
        let cli = parse(&["--quick", "--fanout-conns", "50", "--fleet-agents", "7"]).unwrap();
        assert_eq!((cli.plan().fanout_conns, cli.plan().fleet_agents), (50, 7));
        let cli = parse(&["--conns", "640"]).unwrap();
        assert_eq!(cli.plan().conns, 640);
        assert!(cli.command().ends_with("-- --conns 640"));
        assert!(parse(&["--conns", "63"]).is_err());
        let cli = parse(&[
            "--soak-short",
            "500",
            "--soak-long",
            "0",
            "--soak-flaps",
            "3",
        ])
        .unwrap();
        let plan = cli.plan();
        assert_eq!(
            (plan.soak_short, plan.soak_long, plan.soak_flaps),
            (500, 0, 3)
        );
        assert!(cli
            .command()
            .ends_with("-- --soak-short 500 --soak-long 0 --soak-flaps 3"));
        assert!(parse(&["--soak-short", "0"]).is_err());
        assert!(parse(&["--fanout-conns", "0"]).is_err());
        assert!(parse(&["--fleet-agents", "100001"]).is_err());
    }

    #[test]
    fn only_selects_workloads_and_names_unknown_ones() {
        let cli = parse(&["--quick", "--only", "ping-pong, conn-rate"]).unwrap();
        assert_eq!(cli.only, [Workload::PingPong, Workload::ConnRate]);
        assert!(cli.runs(Workload::ConnRate) && !cli.runs(Workload::Bulk));
        assert_eq!(
            cli.command(),
            "cargo build --release --bins && cargo run --release -p benches -- --quick --only ping-pong,conn-rate"
        );
        let e = parse(&["--only", "bulk,pingpong"]).unwrap_err().to_string();
        assert!(e.contains("unknown workload \"pingpong\""), "{e}");
        assert!(
            e.contains("known: bulk,ping-pong,conn-rate,echo,transports,fleet,soak,attacks"),
            "{e}"
        );
    }

    #[test]
    fn forward_stands_alone() {
        let cli = parse(&["--forward", "198.18.0.1:7200=198.18.1.2:7300"]).unwrap();
        assert_eq!(
            cli.forward.as_deref(),
            Some("198.18.0.1:7200=198.18.1.2:7300")
        );
        assert!(parse(&["--quick", "--forward", "a=b"]).is_err());
    }
}
