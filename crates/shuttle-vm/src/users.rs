//! Resolving `--user NAME|UID[:GID]` against a VM's own /etc/passwd and /etc/group (the VM
//! may have users the host lacks, such as `postgres` installed only inside it).

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error(
        "no user {0:?} in the VM's /etc/passwd: create it inside the VM or give a numeric UID"
    )]
    Unknown(String),
    #[error("invalid user {0:?}: give NAME, UID or UID:GID")]
    Malformed(String),
}

fn parse_passwd(
    passwd: &str,
    pred: impl Fn(&str, u32) -> bool,
) -> Option<(String, u32, u32, String)> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let uid = f[2].parse().ok()?;
        let gid = f[3].parse().ok()?;
        pred(f[0], uid).then(|| (f[0].to_owned(), uid, gid, f[5].to_owned()))
    })
}

fn supplementary_groups(group: &str, name: &str) -> Vec<u32> {
    group
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m == name) {
                return None;
            }
            f[2].parse().ok()
        })
        .collect()
}

/// Resolves `spec` given the contents of passwd and group files. `UID:GID:G1,G2,...` (the
/// last part possibly empty) names the supplementary groups itself instead of the group file:
/// what a monitor asks for a caller whose groups it has from the kernel.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<User, UserError> {
    let malformed = || UserError::Malformed(spec.to_owned());
    let (spec_ids, explicit_groups) = match spec.splitn(3, ':').nth(2) {
        Some(list) => {
            let groups: Result<Vec<u32>, _> = list
                .split(',')
                .filter(|g| !g.is_empty())
                .map(str::parse::<u32>)
                .collect();
            let cut = spec.len() - list.len() - 1;
            (&spec[..cut], Some(groups.map_err(|_| malformed())?))
        }
        None => (spec, None),
    };
    let (user_part, group_part) = match spec_ids.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec_ids, None),
    };
    if user_part.is_empty() {
        return Err(malformed());
    }
    let explicit_gid = match group_part {
        Some(g) => Some(g.parse::<u32>().map_err(|_| malformed())?),
        None => None,
    };
    let mut user = if let Ok(uid) = user_part.parse::<u32>() {
        match parse_passwd(passwd, |_, u| u == uid) {
            Some((name, _, gid, home)) => User {
                uid,
                gid,
                home: Some(home),
                groups: supplementary_groups(group, &name),
                name: Some(name),
            },
            None => User {
                uid,
                gid: uid,
                home: None,
                name: None,
                groups: vec![],
            },
        }
    } else {
        let (name, uid, gid, home) = parse_passwd(passwd, |n, _| n == user_part)
            .ok_or_else(|| UserError::Unknown(user_part.to_owned()))?;
        User {
            uid,
            gid,
            home: Some(home),
            groups: supplementary_groups(group, &name),
            name: Some(name),
        }
    };
    if let Some(g) = explicit_gid {
        user.gid = g;
    }
    if let Some(groups) = explicit_groups {
        if group_part.is_none() {
            return Err(malformed());
        }
        user.groups = groups;
    }
    Ok(user)
}

/// Resolves `spec` against the files of the root the caller is in (the VM's, for its init).
pub fn resolve(spec: &str, root: &Path) -> Result<User, UserError> {
    let passwd = read_small(&root.join("etc/passwd"));
    let group = read_small(&root.join("etc/group"));
    resolve_in(spec, &passwd, &group)
}

/// Reads a VM-controlled file without letting it hang or flood init: a regular file only,
/// never through a final symlink, never blocking, at most 4 MiB.
fn read_small(path: &Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
    else {
        return String::new();
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut text = String::new();
    let _ = f.take(4 << 20).read_to_string(&mut text);
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\npostgres:x:105:110:PostgreSQL:/var/lib/postgresql:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nssl-cert:x:109:postgres\npostgres:x:110:\n";

    #[test]
    fn names_and_numbers() {
        let pg = resolve_in("postgres", PASSWD, GROUP).unwrap();
        assert_eq!((pg.uid, pg.gid), (105, 110));
        assert_eq!(pg.groups, vec![109]);
        assert_eq!(pg.home.as_deref(), Some("/var/lib/postgresql"));
        let n = resolve_in("1234:99", PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid), (1234, 99));
        assert_eq!(
            resolve_in("0", PASSWD, GROUP).unwrap().home.as_deref(),
            Some("/root")
        );
        // The groups given, not the group file's.
        let g = resolve_in("105:110:5,7", PASSWD, GROUP).unwrap();
        assert_eq!((g.uid, g.gid, g.groups), (105, 110, vec![5, 7]));
        assert!(resolve_in("105:110:", PASSWD, GROUP)
            .unwrap()
            .groups
            .is_empty());
        assert!(resolve_in("105:110:x", PASSWD, GROUP).is_err());
    }

    #[test]
    fn errors() {
        assert_eq!(
            resolve_in("nobody2", PASSWD, GROUP),
            Err(UserError::Unknown("nobody2".into()))
        );
        assert_eq!(
            resolve_in("1:x", PASSWD, GROUP),
            Err(UserError::Malformed("1:x".into()))
        );
        assert_eq!(
            resolve_in(":1", PASSWD, GROUP),
            Err(UserError::Malformed(":1".into()))
        );
    }
}
