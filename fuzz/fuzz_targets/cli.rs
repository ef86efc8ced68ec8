//! Fuzzes the command line: argument vectors made of the VMM's flags and arbitrary strings,
//! through the VMM's own parser (compiled in here; the VMM is a binary crate). Besides never
//! panicking, what parses is within the documented ranges: memory a multiple of 4K between the
//! minimum and the maximum, 1..=64 vCPUs, at most 16 root ports, a `--root-port-hotplug` that
//! names no port twice, disks with a path and valid ids, a stall timeout of 1..=3600 s; and a
//! size or disk that parses prints back to one that parses the same.

#![no_main]

use clap::Parser;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../vmm/src/config.rs"]
mod config;

use config::*;

const FLAGS: &[&str] = &[
    "--kernel",
    "--initramfs",
    "--cmdline",
    "--memory",
    "--cpus",
    "--root-ports",
    "--no-command-completed",
    "--root-port-hotplug",
    "--osc-native-hotplug",
    "--surprise-in-flight",
    "--backend-error",
    "--surprise-bar-reads",
    "--unplug-stall-timeout",
    "--hotplug-trace",
    "--aio",
    "--disk",
    "--qmp",
    "-S",
    "--incoming",
    "--serial",
    "--help",
    "--version",
];

const VALUES: &[&str] = &[
    "k",
    "512M",
    "64M",
    "1G",
    "0",
    "1",
    "2",
    "64",
    "65",
    "16",
    "17",
    "-1",
    "native",
    "acpi",
    "rp0=acpi",
    "acpi,rp0=native",
    "rp16=acpi",
    "grant",
    "deny",
    "fail",
    "drop",
    "zero",
    "all-ones",
    "report",
    "surprise-remove",
    "auto",
    "io_uring",
    "threads",
    "path=/x",
    "path=/x,format=qcow2,id=d0,readonly=on,bus=rp1",
    "path=,id=0x",
    "stdio",
    "null",
    "file=",
    "file=/tmp/c",
    "unix:/s",
    "defer",
    "exec:cat f",
    "4097K",
    "99999999999999999999G",
];

#[derive(Arbitrary, Debug)]
enum Token {
    Flag(u8),
    Value(u8),
    Text(String),
}

fuzz_target!(|tokens: Vec<Token>| {
    let mut args = vec!["hotplug-vmm".to_string()];
    args.extend(tokens.into_iter().take(24).map(|t| match t {
        Token::Flag(i) => FLAGS[usize::from(i) % FLAGS.len()].to_string(),
        Token::Value(i) => VALUES[usize::from(i) % VALUES.len()].to_string(),
        Token::Text(s) => s,
    }));
    for a in &args[1..] {
        // Each argument alone, through the parsers the flags use.
        if let Ok(bytes) = parse_size(a) {
            assert!(
                (MIN_MEMORY..=MAX_MEMORY).contains(&bytes) && bytes % 4096 == 0,
                "{a}"
            );
            assert_eq!(parse_size(&bytes.to_string()), Ok(bytes));
        }
        if let Ok(disk) = parse_disk(a) {
            assert!(!disk.path.as_os_str().is_empty());
            if let Some(id) = &disk.id {
                assert!(check_id(id).is_ok());
            }
        }
        if let Ok(h) = parse_root_port_hotplug(a) {
            assert!(h.ports.keys().all(|&n| n < MAX_ROOT_PORTS), "{a}: {h:?}");
        }
    }
    let Ok(cli) = Cli::try_parse_from(&args) else {
        return;
    };
    assert!((MIN_MEMORY..=MAX_MEMORY).contains(&cli.memory) && cli.memory % 4096 == 0);
    assert!((1..=MAX_CPUS).contains(&cli.cpus));
    assert!(cli.root_ports <= MAX_ROOT_PORTS);
    assert!((1..=3600).contains(&cli.unplug_stall_timeout));
    assert!(cli.kernel.is_some() || cli.incoming.is_some());
    for disk in &cli.disk {
        assert!(!disk.path.as_os_str().is_empty());
        assert!(disk.id.as_deref().is_none_or(|id| check_id(id).is_ok()));
    }
});
