//! PURE: what monitoring calls a VM. A name is the one the user gave (`NAME=SOCKET`), else QEMU's `-name` (QMP
//! `query-name`, asked at the VM's first successful sample), else the socket's file name without `.qmp`. [`Names`]
//! keeps one name per target for `stats`, `top` and `serve`, unique among the targets. No I/O: the sampler asks
//! QEMU, this module only decides.
//!
//! Names come from the command line, from file names and from whatever answers on a socket: they are kept as they
//! are here, and made printable ([`crate::text::printable`]) where they are printed or exported.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

/// One VM to watch, as given on the command line: its QMP socket and, with `NAME=SOCKET`, its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The name the user gave; `None` for a bare socket.
    pub name: Option<String>,
    pub socket: String,
}

impl Target {
    /// `NAME=SOCKET` names the VM; a bare socket is named later (see [`vm_name`]). A `/` or `:` before the `=` means
    /// the `=` belongs to the path or address, not a name.
    pub fn parse(arg: &str) -> Target {
        match arg.split_once('=') {
            Some((name, socket))
                if !name.is_empty() && !socket.is_empty() && !name.contains(['/', ':']) =>
            {
                Target {
                    name: Some(name.into()),
                    socket: socket.into(),
                }
            }
            _ => Target {
                name: None,
                socket: arg.into(),
            },
        }
    }
}

/// Where a VM's name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NameSource {
    /// `NAME=SOCKET` on the command line.
    Given,
    /// QEMU's `-name`, through `query-name`.
    Qemu,
    /// The socket's file name, without `.qmp`.
    SocketFile,
    /// The whole socket path or address: the shorter name would have been another target's too.
    SocketPath,
}

impl NameSource {
    pub fn as_str(self) -> &'static str {
        match self {
            NameSource::Given => "given",
            NameSource::Qemu => "qemu",
            NameSource::SocketFile => "socket-file",
            NameSource::SocketPath => "socket-path",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmName {
    pub name: String,
    pub from: NameSource,
}

/// A VM's name from what is known of it: the name the user gave, else QEMU's answer to `query-name` (`None` when
/// not asked yet, or when QEMU runs without `-name`), else the socket's file name. An empty or blank name counts as
/// none.
pub fn vm_name(given: Option<&str>, qemu: Option<&str>, socket: &str) -> VmName {
    let present = |n: Option<&str>| n.filter(|n| !n.trim().is_empty()).map(str::to_string);
    if let Some(name) = present(given) {
        return VmName {
            name,
            from: NameSource::Given,
        };
    }
    if let Some(name) = present(qemu) {
        return VmName {
            name,
            from: NameSource::Qemu,
        };
    }
    match socket_stem(socket) {
        Some(name) => VmName {
            name,
            from: NameSource::SocketFile,
        },
        None => VmName {
            name: socket.to_string(),
            from: NameSource::SocketPath,
        },
    }
}

/// `/run/vm/web1.qmp` → `web1`, `unix:/run/vm/web1.sock` → `web1.sock`; `tcp:host:4444` has no directory and stays
/// whole. `None` when there is no file name to speak of (`/`, `..`, an empty one).
fn socket_stem(socket: &str) -> Option<String> {
    let path = socket.strip_prefix("unix:").unwrap_or(socket);
    let file = Path::new(path).file_name()?.to_string_lossy();
    let stem = file
        .strip_suffix(".qmp")
        .filter(|s| !s.is_empty())
        .unwrap_or(&file);
    (!stem.trim().is_empty()).then(|| stem.to_string())
}

struct Entry {
    target: Target,
    /// Whether QEMU was asked (at the first successful sample); the name is final then.
    resolved: bool,
    name: VmName,
}

/// One name per target, unique among them, resolved once per target. A name another target already goes by is not
/// taken twice: at the start, a given name several targets share, or a file name that is another target's given
/// or file name too, gives way to the socket path; later, a VM whose `-name` another target already goes by keeps
/// the name it has.
pub struct Names {
    entries: Vec<Entry>,
}

impl Names {
    /// Targets as `[NAME=]SOCKET` arguments ([`Target::parse`]).
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Names {
        Names::new(args.iter().map(|a| Target::parse(a.as_ref())).collect())
    }

    /// Every target with its name before QEMU was asked: the given name, else the socket's file name.
    pub fn new(targets: Vec<Target>) -> Names {
        let first: Vec<VmName> = targets
            .iter()
            .map(|t| vm_name(t.name.as_deref(), None, &t.socket))
            .collect();
        // Given names come first: a file name yields to a given name, and to another target's file name.
        let mut given: HashMap<&str, usize> = HashMap::new();
        let mut files: HashMap<&str, usize> = HashMap::new();
        for n in &first {
            let count = if n.from == NameSource::Given {
                &mut given
            } else {
                &mut files
            };
            *count.entry(n.name.as_str()).or_default() += 1;
        }
        let times = |m: &HashMap<&str, usize>, name: &str| m.get(name).copied().unwrap_or(0);
        let shared: Vec<bool> = first
            .iter()
            .map(|n| match n.from {
                NameSource::Given => times(&given, &n.name) > 1,
                _ => times(&given, &n.name) > 0 || times(&files, &n.name) > 1,
            })
            .collect();
        let entries = targets
            .into_iter()
            .zip(first)
            .zip(shared)
            .map(|((target, name), shared)| {
                let name = if shared {
                    VmName {
                        name: target.socket.clone(),
                        from: NameSource::SocketPath,
                    }
                } else {
                    name
                };
                Entry {
                    // A given name is final (even one that gave way to the path): QEMU need not be asked.
                    resolved: target.name.is_some(),
                    target,
                    name,
                }
            })
            .collect();
        Names { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn target(&self, i: usize) -> &Target {
        &self.entries[i].target
    }

    pub fn name(&self, i: usize) -> &VmName {
        &self.entries[i].name
    }

    /// Whether target `i` still wants QEMU's name: true until [`Names::resolve`] was called for it.
    pub fn wants_qemu_name(&self, i: usize) -> bool {
        !self.entries[i].resolved
    }

    /// Records QEMU's answer to `query-name` for target `i` (`None`: no `-name`) and settles its name for good.
    /// Returns the name it had when that changed. Only the first call per target counts.
    pub fn resolve(&mut self, i: usize, qemu: Option<&str>) -> Option<VmName> {
        if self.entries[i].resolved {
            return None;
        }
        self.entries[i].resolved = true;
        let e = &self.entries[i];
        let want = vm_name(e.target.name.as_deref(), qemu, &e.target.socket);
        // Only QEMU's name is new here: the fallbacks were settled (and made unique) at the start.
        if want.from != NameSource::Qemu {
            return None;
        }
        if want.name == e.name.name {
            // `-name db` on `db.qmp`: the same name, now known to be QEMU's; nothing to rename.
            self.entries[i].name.from = NameSource::Qemu;
            return None;
        }
        let taken = self
            .entries
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.name.name == want.name);
        if taken {
            return None;
        }
        Some(std::mem::replace(&mut self.entries[i].name, want))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NameSource::{Given, Qemu, SocketFile, SocketPath};

    /// (given name, query-name answer, socket) → (name, source)
    type NameCase<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        &'a str,
        &'a str,
        NameSource,
    );

    #[test]
    fn a_name_is_the_given_one_else_qemus_else_the_socket_file() {
        let cases: &[NameCase] = &[
            (
                Some("web1"),
                Some("qemu-web"),
                "/run/vm/a.qmp",
                "web1",
                Given,
            ),
            (Some("web1"), None, "/run/vm/a.qmp", "web1", Given),
            (None, Some("qemu-web"), "/run/vm/a.qmp", "qemu-web", Qemu),
            (None, None, "/run/vm/a.qmp", "a", SocketFile),
            (None, None, "unix:/run/vm/a.qmp", "a", SocketFile),
            (None, None, "a.qmp", "a", SocketFile),
            (None, None, "/run/vm/a.qmp.mon2", "a.qmp.mon2", SocketFile),
            (None, None, "/run/vm/a.sock", "a.sock", SocketFile),
            (None, None, "/run/vm/.qmp", ".qmp", SocketFile),
            (None, None, "tcp:host:4444", "tcp:host:4444", SocketFile),
            (None, None, "/", "/", SocketPath),
            (None, None, "/run/vm/..", "/run/vm/..", SocketPath),
            // empty or blank names are no names
            (Some(""), Some(""), "/run/vm/a.qmp", "a", SocketFile),
            (Some(" "), Some("\t"), "/run/vm/a.qmp", "a", SocketFile),
            (None, Some(""), "/run/vm/a.qmp", "a", SocketFile),
            // kept as they are; made printable where printed
            (None, Some("evil\u{1b}[2J"), "/x.qmp", "evil\u{1b}[2J", Qemu),
        ];
        for (given, qemu, socket, name, from) in cases {
            let got = vm_name(*given, *qemu, socket);
            assert_eq!(
                (got.name.as_str(), got.from),
                (*name, *from),
                "{given:?} {qemu:?} {socket:?}"
            );
        }
    }

    #[test]
    fn targets_take_a_name_only_before_a_plain_equals_sign() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("web1=/run/vm/web1.qmp", Some("web1"), "/run/vm/web1.qmp"),
            ("/run/vm/a=b.qmp", None, "/run/vm/a=b.qmp"),
            ("tcp:host:4444", None, "tcp:host:4444"),
            ("db=tcp:host:4444", Some("db"), "tcp:host:4444"),
            ("=x", None, "=x"),
            ("x=", None, "x="),
        ];
        for (arg, name, socket) in cases {
            let t = Target::parse(arg);
            assert_eq!(
                (t.name.as_deref(), t.socket.as_str()),
                (*name, *socket),
                "{arg}"
            );
        }
    }

    fn names(n: &Names) -> Vec<(&str, NameSource)> {
        (0..n.len())
            .map(|i| (n.name(i).name.as_str(), n.name(i).from))
            .collect()
    }

    #[test]
    fn names_start_unique_and_settle_once() {
        let mut n = Names::parse(&[
            "web=/a/x.qmp",
            "/a/monitor.sock",
            "/b/monitor.sock",
            "/c/db.qmp",
            "/c/other.qmp",
            "/d/same.qmp",
        ]);
        // A file name two targets share names neither.
        assert_eq!(
            names(&n),
            [
                ("web", Given),
                ("/a/monitor.sock", SocketPath),
                ("/b/monitor.sock", SocketPath),
                ("db", SocketFile),
                ("other", SocketFile),
                ("same", SocketFile),
            ]
        );
        // A given name is final; the others wait for QEMU.
        let wants: Vec<bool> = (0..n.len()).map(|i| n.wants_qemu_name(i)).collect();
        assert_eq!(wants, [false, true, true, true, true, true]);
        assert_eq!(n.resolve(0, Some("qemu-web")), None);
        assert_eq!(n.name(0).name, "web");

        // QEMU's name replaces a fallback, and the old one is handed back (serve drops its series).
        let old = n.resolve(1, Some("front")).expect("renamed");
        assert_eq!(
            (old.name.as_str(), old.from),
            ("/a/monitor.sock", SocketPath)
        );
        assert!(!n.wants_qemu_name(1));
        // A -name another target goes by is not taken twice; the VM keeps its name.
        assert_eq!(n.resolve(2, Some("front")), None);
        assert_eq!(n.resolve(4, Some("web")), None);
        assert!(!n.wants_qemu_name(4));
        // No -name: the fallback stays. The same -name as the file: not a rename.
        assert_eq!(n.resolve(3, None), None);
        assert_eq!(n.resolve(3, Some("later")), None, "resolved once only");
        assert_eq!(n.resolve(5, Some("same")), None);
        assert_eq!(
            names(&n),
            [
                ("web", Given),
                ("front", Qemu),
                ("/b/monitor.sock", SocketPath),
                ("db", SocketFile),
                ("other", SocketFile),
                ("same", Qemu),
            ]
        );
        let wants: Vec<bool> = (0..n.len()).map(|i| n.wants_qemu_name(i)).collect();
        assert_eq!(wants, [false; 6]);
    }

    #[test]
    fn a_given_name_two_targets_share_gives_way_to_their_paths() {
        let mut n = Names::parse(&["web=/a.qmp", "web=/b.qmp"]);
        assert_eq!(names(&n), [("/a.qmp", SocketPath), ("/b.qmp", SocketPath)]);
        // Given names are final: QEMU is not asked.
        assert!(!n.wants_qemu_name(0));
        assert_eq!(n.resolve(0, Some("q")), None);
        assert_eq!(n.name(0).name, "/a.qmp");

        // A file name gives way to a given name.
        let n = Names::parse(&["/b/web.qmp", "web=/a/x.qmp"]);
        assert_eq!(names(&n), [("/b/web.qmp", SocketPath), ("web", Given)]);
    }
}
