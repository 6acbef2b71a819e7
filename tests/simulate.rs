//! `qmigrate simulate` end to end: the built binary on the scenario files in tests/scenarios. One module per theme:
//! paper 000's golden tables, paper 004's idc-against-sandpiper experiments, malformed scenarios and the CLI's
//! other failures, the bounds on input, and hostile names.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmigrate"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("qmigrate runs")
}

/// Runs a policy with `--json` and returns, per round, the migrations as (vm, from, to) and the balloon changes as
/// (vm, host, from MiB, to MiB).
#[allow(clippy::type_complexity)]
fn rounds(
    file: &str,
    policy: &str,
    rounds: u32,
) -> Vec<(
    Vec<(String, String, String)>,
    Vec<(String, String, u64, u64)>,
)> {
    let out = run(&[
        scenario(file).to_str().unwrap(),
        "--policy",
        policy,
        "--rounds",
        &rounds.to_string(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{file} {policy}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let s = |x: &Value| x.as_str().unwrap().to_owned();
    v["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            for m in r["migrations"].as_array().unwrap() {
                assert!(
                    !m["reason"].as_str().unwrap().is_empty(),
                    "every decision has a reason"
                );
            }
            let migrations = r["migrations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| (s(&m["vm"]), s(&m["from"]), s(&m["to"])))
                .collect();
            let balloons = r["balloons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        s(&b["vm"]),
                        s(&b["host"]),
                        b["from_mib"].as_u64().unwrap(),
                        b["to_mib"].as_u64().unwrap(),
                    )
                })
                .collect();
            (migrations, balloons)
        })
        .collect()
}

/// The migrations of each round, for scenarios where no balloon is expected.
fn moves(file: &str, policy: &str, n: u32) -> Vec<Vec<(String, String, String)>> {
    rounds(file, policy, n)
        .into_iter()
        .map(|(m, b)| {
            assert!(b.is_empty(), "{file} {policy}: unexpected balloon {b:?}");
            m
        })
        .collect()
}

fn mv(vm: &str, from: &str, to: &str) -> (String, String, String) {
    (vm.into(), from.into(), to.into())
}

mod golden_paper_000 {
    use super::*;

    #[test]
    fn table_1_moves_n3v3_from_node3_to_node2() {
        assert_eq!(
            moves("paper000-table1.json", "band", 1),
            vec![vec![mv("N3V3", "node3", "node2")]]
        );
    }

    #[test]
    fn table_2_moves_n2v2_from_node2_to_node3() {
        assert_eq!(
            moves("paper000-table2.json", "band", 1),
            vec![vec![mv("N2V2", "node2", "node3")]]
        );
    }

    #[test]
    fn table_4_moves_nothing() {
        assert_eq!(
            moves("paper000-table4.json", "band", 1),
            vec![Vec::<(String, String, String)>::new()]
        );
    }

    #[test]
    fn table_1_settles_after_one_move() {
        // By the load-move model N3V3's 25.62 points leave node3 (37.80 %) and land on node2 (46.71 %): all moderate.
        let r = moves("paper000-table1.json", "band", 3);
        assert_eq!(r[0], vec![mv("N3V3", "node3", "node2")]);
        assert!(r[1].is_empty() && r[2].is_empty(), "{r:?}");
    }

    #[test]
    fn text_output_gives_the_band_and_the_vector() {
        let out = run(&[
            scenario("paper000-table1.json").to_str().unwrap(),
            "--policy",
            "band",
        ]);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("moderate band 33.64%..53.64%"), "{text}");
        assert!(text.contains("migrate N3V3: node3 -> node2"), "{text}");
        assert!(
            text.contains("migration vector 43.64 - 21.09 = 22.55"),
            "{text}"
        );
    }
}

mod idc_against_sandpiper {
    use super::*;

    #[test]
    fn cpu_overload_sandpiper_splits_the_pair_idc_moves_the_isolated_vm() {
        let f = "paper004-cpu-isolated.json";
        assert_eq!(
            moves(f, "sandpiper", 1),
            vec![vec![mv("VM1", "PM1", "PM3")]]
        );
        assert_eq!(moves(f, "idc", 1), vec![vec![mv("VM4", "PM1", "PM3")]]);
    }

    #[test]
    fn group_reunion() {
        let f = "paper004-group-reunion.json";
        assert_eq!(
            moves(f, "sandpiper", 1),
            vec![vec![mv("VM1", "PM1", "PM2")]]
        );
        assert_eq!(moves(f, "idc", 1), vec![vec![mv("VM3", "PM1", "PM2")]]);
    }

    #[test]
    fn network_overload_idc_joins_the_peer_sandpiper_takes_the_idle_host() {
        let f = "paper004-network.json";
        assert_eq!(
            moves(f, "sandpiper", 1),
            vec![vec![mv("VM3", "PM1", "PM4")]]
        );
        assert_eq!(moves(f, "idc", 1), vec![vec![mv("VM3", "PM1", "PM3")]]);
    }

    #[test]
    fn memory_overload_balloons_before_migrating() {
        let f = "paper004-memory.json";
        let balloon = ("VM1".to_owned(), "PM1".to_owned(), 64, 96);
        // Round 1: both raise VM1's balloon by one 32 MiB step. Round 2: PM1 has 30 MiB left, less than a step, so
        // they migrate; idc moves VM3 next to its peer VM4, Sandpiper moves the swapping VM1 itself.
        let idc = rounds(f, "idc", 2);
        assert_eq!(idc[0], (vec![], vec![balloon.clone()]));
        assert_eq!(idc[1], (vec![mv("VM3", "PM1", "PM2")], vec![]));
        let sandpiper = rounds(f, "sandpiper", 2);
        assert_eq!(sandpiper[0], (vec![], vec![balloon]));
        assert_eq!(sandpiper[1], (vec![mv("VM1", "PM1", "PM2")], vec![]));
    }

    #[test]
    fn once_relieved_nothing_more_moves() {
        for f in [
            "paper004-cpu-isolated.json",
            "paper004-group-reunion.json",
            "paper004-network.json",
        ] {
            for p in ["idc", "sandpiper"] {
                let r = moves(f, p, 3);
                assert_eq!(r[0].len(), 1, "{f} {p}: {r:?}");
                assert!(r[1].is_empty() && r[2].is_empty(), "{f} {p}: {r:?}");
            }
        }
    }

    #[test]
    fn paper_000_tables_have_no_hotspot() {
        for f in [
            "paper000-table1.json",
            "paper000-table2.json",
            "paper000-table4.json",
        ] {
            for p in ["idc", "sandpiper"] {
                assert_eq!(moves(f, p, 1), vec![vec![]], "{f} {p}");
            }
        }
    }
}

mod malformed {
    use super::*;

    fn fails(args: &[&str], message: &str) {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end(), format!("error: {message}"), "{args:?}");
    }

    #[test]
    fn each_malformed_scenario_names_its_entry() {
        let cases = [
            (
                "malformed-unknown-host.json",
                r#"vm "N1V9": host "node9" is not in the scenario"#,
            ),
            (
                "malformed-duplicate-host.json",
                r#"host "node1" is listed twice"#,
            ),
            (
                "malformed-duplicate-vm.json",
                r#"vm "N1V1" is listed twice"#,
            ),
            (
                "malformed-negative.json",
                r#"host "node2": cpu_pct is negative (-5)"#,
            ),
            (
                "malformed-non-numeric.json",
                r#"vm "N1V1": memory_mib must be a number, found "lots""#,
            ),
            ("malformed-no-host.json", r#"vm "N2V7" is on no host"#),
            (
                "malformed-unknown-traffic-vm.json",
                r#"traffic "N1V1"-"VM9": vm "VM9" is not in the scenario"#,
            ),
            (
                "malformed-not-json.json",
                "scenario is not valid JSON: EOF while parsing a value at line 2 column 0",
            ),
        ];
        for (file, message) in cases {
            for policy in ["band", "idc", "sandpiper"] {
                fails(
                    &[
                        scenario(file).to_str().unwrap(),
                        "--policy",
                        policy,
                        "--json",
                    ],
                    message,
                );
            }
        }
    }

    #[test]
    fn unknown_policy() {
        fails(
            &[
                scenario("paper000-table1.json").to_str().unwrap(),
                "--policy",
                "roundrobin",
            ],
            r#"unknown policy "roundrobin" (expected band, idc or sandpiper)"#,
        );
    }

    #[test]
    fn zero_rounds() {
        fails(
            &[
                scenario("paper000-table1.json").to_str().unwrap(),
                "--policy",
                "band",
                "--rounds",
                "0",
            ],
            "--rounds must be at least 1",
        );
    }

    #[test]
    fn missing_file() {
        let path = scenario("no-such-scenario.json");
        let path = path.to_str().unwrap();
        let out = run(&[path, "--policy", "band"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with(&format!("error: cannot read scenario {path}: ")),
            "{err}"
        );
    }
}

mod bounds {
    use super::*;

    use std::time::{Duration, Instant};

    /// Runs and expects exit 2 with nothing on stdout; returns stderr.
    fn refused(args: &[&str]) -> String {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn rounds_over_the_limit_are_refused() {
        let err = refused(&[
            scenario("paper000-table1.json").to_str().unwrap(),
            "--policy",
            "band",
            "--rounds",
            "10001",
        ]);
        assert_eq!(
            err.trim_end(),
            "error: --rounds must be at most 10000, found 10001"
        );
        let out = run(&[
            scenario("paper000-table1.json").to_str().unwrap(),
            "--policy",
            "band",
            "--rounds",
            "10000",
            "--json",
        ]);
        assert!(out.status.success(), "the limit itself is allowed");
    }

    #[test]
    fn a_device_is_refused_quickly_and_by_name() {
        // /dev/zero never ends: reading it whole would fill memory.
        let started = Instant::now();
        let err = refused(&["/dev/zero", "--policy", "band"]);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            err.trim_end(),
            "error: scenario /dev/zero is not a regular file"
        );
    }

    #[test]
    fn an_oversized_file_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.json");
        // Sparse: 1 TiB on paper, nothing on disk; reading it would take minutes and all of memory.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let path = path.to_str().unwrap();
        let started = Instant::now();
        let err = refused(&[path, "--policy", "band"]);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            err.trim_end(),
            format!("error: scenario {path} is larger than the limit of 67108864 bytes")
        );
    }

    #[test]
    fn a_file_one_byte_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 * 1024 * 1024 + 1)
            .unwrap();
        let err = refused(&[path.to_str().unwrap(), "--policy", "band"]);
        assert!(
            err.contains("is larger than the limit of 67108864 bytes"),
            "{err}"
        );
    }

    #[test]
    fn too_many_vms_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crowd.json");
        let vms: Vec<Value> = (0..100_001)
            .map(|i| {
                serde_json::json!({"name": format!("vm{i}"), "host": "node1", "cpu_pct": 0, "memory_mib": 1,
                                   "memory_pct": 0, "nic_mbps": 0, "swap_writes_per_s": 0})
            })
            .collect();
        let s = serde_json::json!({
            "hosts": [{"name": "node1", "cpus": 4, "memory_mib": 3072, "nic_mbps": 1000, "cpu_pct": 10,
                       "swap_writes_per_s": 0, "nic_pct": 0}],
            "vms": vms,
        });
        std::fs::write(&path, s.to_string()).unwrap();
        let err = refused(&[path.to_str().unwrap(), "--policy", "idc"]);
        assert_eq!(
            err.trim_end(),
            "error: scenario lists 100001 vms, above the limit of 100000"
        );
    }
}

mod hostile_names {
    use super::*;

    #[test]
    fn the_table_escapes_control_characters_in_names() {
        let out = run(&[
            scenario("escape-in-names.json").to_str().unwrap(),
            "--policy",
            "band",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.stdout.contains(&0x1b),
            "an ESC byte reached the terminal"
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        // The names are still there, spelt out, and the decision is the same as on the clean table.
        assert!(
            text.contains("migrate N3V3\\x1b[31m: node3 -> node2\\u{9b}2J\\x0afake"),
            "{text}"
        );
    }

    #[test]
    fn json_keeps_the_names_exactly() {
        let out = run(&[
            scenario("escape-in-names.json").to_str().unwrap(),
            "--policy",
            "band",
            "--json",
        ]);
        assert!(out.status.success());
        assert!(!out.stdout.contains(&0x1b), "JSON escapes ESC itself");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["rounds"][0]["migrations"][0]["vm"], "N3V3\u{1b}[31m");
        assert_eq!(v["rounds"][0]["migrations"][0]["to"], "node2\u{9b}2J\nfake");
    }

    #[test]
    fn errors_escape_control_characters_in_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.json");
        let mut s: Value =
            serde_json::from_slice(&std::fs::read(scenario("escape-in-names.json")).unwrap())
                .unwrap();
        s["vms"][0]["name"] = s["vms"][8]["name"].clone();
        std::fs::write(&path, s.to_string()).unwrap();
        let out = run(&[path.to_str().unwrap(), "--policy", "band"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            !out.stderr.contains(&0x1b),
            "an ESC byte reached the terminal"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim_end(),
            r#"error: vm "N3V3\u{1b}[31m" is listed twice"#
        );
    }
}
