//! Shell completions (`clap_complete`) and man pages (`clap_mangen`) generated from a clap [`Command`], for
//! `qmigrate completions SHELL` and `qmigrate man --out DIR`. It only renders what the command definition says; it
//! must not define commands or arguments itself (that is `cli.rs`), so the pages and completions cannot drift from
//! the binary.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;
use clap_mangen::Man;

/// Writes `shell`'s completion script for `cmd` to `out`. The script completes the command's own name (its bin name
/// if set, else its name), so `cmd` should be the binary's top-level command. Hidden subcommands are completed too:
/// `clap_complete`'s generators do not skip them (clap-rs/clap#1335), and `clap::Command` cannot drop one.
/// qmigrate hides none.
///
/// The script is rendered in memory first: `clap_complete` panics when its writer fails, and a closed pipe
/// (`qmigrate completions bash | head`) or a full disk is an error to report, not a crash.
pub fn write_completions(mut cmd: Command, shell: Shell, out: &mut dyn Write) -> io::Result<()> {
    let bin = cmd
        .get_bin_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, bin, &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// Writes section-1 man pages for `cmd` into `dir` (created if missing): `NAME.1` for the command itself and
/// `NAME-SUB.1` for every subcommand, nested ones included (`qmigrate-inventory-check.1`). Hidden subcommands and
/// clap's generated `help` subcommand get no page. Returns the paths written, the top-level page first, then each
/// subcommand's page before its own subcommands'.
pub fn write_man_pages(cmd: &Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let name = cmd.get_name().to_string();
    // `build` fills in every subcommand's bin name ("qmigrate inventory check"), which the synopses print. Without
    // the help subcommand: `qmigrate help X` is not a page of its own.
    let mut cmd = cmd.clone().bin_name(&name).disable_help_subcommand(true);
    cmd.build();
    // Every page's footer names the program and its version; a subcommand has no version of its own.
    let source = match cmd.get_version() {
        Some(v) => format!("{name} {v}"),
        None => name.clone(),
    };
    let mut written = Vec::new();
    write_page(&cmd, &name, &source, dir, &mut written)?;
    Ok(written)
}

fn write_page(
    cmd: &Command,
    page: &str,
    source: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let path = dir.join(format!("{page}.1"));
    let mut file = io::BufWriter::new(std::fs::File::create(&path)?);
    Man::new(cmd.clone())
        .title(page)
        .source(source)
        .render(&mut file)?;
    file.flush()?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_page = format!("{page}-{}", sub.get_name());
        write_page(sub, &sub_page, source, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    /// A small CLI of the same shape as qmigrate's: flags, a nested subcommand and a hidden one.
    fn demo() -> Command {
        Command::new("demo")
            .version("1.2.3")
            .about("Moves things about")
            .arg(
                Arg::new("verbose")
                    .short('v')
                    .long("verbose")
                    .action(ArgAction::Count)
                    .help("Say more"),
            )
            .subcommand(
                Command::new("migrate").about("Move one VM").arg(
                    Arg::new("from")
                        .long("from")
                        .required(true)
                        .help("Source QMP socket"),
                ),
            )
            .subcommand(
                Command::new("inventory")
                    .about("Hosts and VMs")
                    .subcommand(Command::new("check").about("Check the inventory file"))
                    .subcommand(Command::new("list").about("List the VMs")),
            )
            .subcommand(Command::new("debug-dump").hide(true).about("Internal"))
    }

    #[test]
    fn one_page_per_visible_command_nested_ones_included() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man1");
        let written = write_man_pages(&demo(), &out).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "demo.1",
                "demo-migrate.1",
                "demo-inventory.1",
                "demo-inventory-check.1",
                "demo-inventory-list.1",
            ]
        );
        // Nothing else in the directory: no page for the hidden command or for `help`.
        let mut on_disk: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut want = names.clone();
        want.sort();
        assert_eq!(on_disk, want);

        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
        let top = read("demo.1");
        assert!(top.contains(".TH demo 1"), "{top}");
        assert!(top.contains("Moves things about"), "{top}");
        assert!(top.contains("demo\\-migrate(1)"), "{top}");
        assert!(!top.contains("debug"), "{top}");
        let check = read("demo-inventory-check.1");
        assert!(check.contains(".TH demo-inventory-check 1"), "{check}");
        assert!(check.contains("\"demo 1.2.3\""), "{check}");
        assert!(check.contains("Check the inventory file"), "{check}");
        // The synopsis names the whole command line.
        assert!(check.contains("demo inventory check"), "{check}");
        let migrate = read("demo-migrate.1");
        assert!(
            migrate.contains("\\-\\-from") && migrate.contains("Source QMP socket"),
            "{migrate}"
        );
    }

    #[test]
    fn completions_know_every_visible_subcommand() {
        let script = |shell| {
            let mut out = Vec::new();
            write_completions(demo(), shell, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let bash = script(Shell::Bash);
        for word in [
            "migrate",
            "inventory",
            "check",
            "list",
            "--verbose",
            "--from",
        ] {
            assert!(bash.contains(word), "{word}: {bash}");
        }
        assert!(bash.contains("complete -F _demo"), "{bash}");
        let zsh = script(Shell::Zsh);
        assert!(zsh.starts_with("#compdef demo"), "{zsh}");
        assert!(
            zsh.contains("migrate") && zsh.contains("inventory"),
            "{zsh}"
        );
        let fish = script(Shell::Fish);
        assert!(fish.contains("complete -c demo"), "{fish}");
        assert!(fish.contains("migrate") && fish.contains("check"), "{fish}");
    }

    /// A writer that fails like a pipe whose reader went away.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_writer_is_an_error_not_a_panic() {
        let e = write_completions(demo(), Shell::Bash, &mut ClosedPipe).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        assert!(write_man_pages(&demo(), &file.join("man1")).is_err());
    }
}
