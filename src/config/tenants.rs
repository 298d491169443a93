//! Tenants: one CRM company synced into one EDM account, each a set of
//! settings of its own (`tenants.dir`, a directory of `NAME.toml` files).
//!
//! A tenant file holds `[crm]`, `[edm]`, `[sync]` and `[writeback]`; its
//! keys override the main config's key by key (defaults, file and
//! environment stacked), except `sync.routes` and `sync.vars`, which it
//! replaces whole. A secret given one way in the tenant file (`crm.token`
//! or `crm.token_file`) replaces the main config's, given either way.
//! Without `tenants.dir` there is one tenant, `default`: the main config.
//!
//! A tenant's settings are the scope everything of it runs in: its state
//! lives apart from every other tenant's (`database.url` is rewritten by
//! [`scoped_database_url`]), so a job, a store query or a client built
//! from them cannot reach another tenant's rows.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{Access, ConfigError, Settings};

/// The tenant of a configuration without `tenants.dir`, and the one whose
/// state is where the state database always kept it.
pub const DEFAULT_TENANT: &str = "default";

/// The sections a tenant file may hold.
const TENANT_SECTIONS: [&str; 4] = ["crm", "edm", "sync", "writeback"];

/// `[tenants]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsSettings {
    /// A directory of `NAME.toml` files; unset: one tenant, `default`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// A tenant's name (`[a-z0-9-]{1,40}`): its id in logs, metrics, the
/// state database and on the command line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tenant(String);

impl Default for Tenant {
    fn default() -> Tenant {
        Tenant(DEFAULT_TENANT.to_string())
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Tenant {
    type Err = String;

    fn from_str(name: &str) -> Result<Tenant, String> {
        let valid = (1..=40).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            Ok(Tenant(name.to_string()))
        } else {
            Err(format!(
                "{:?} is not a tenant name: 1 to 40 of a-z, 0-9 and -",
                name.chars().take(60).collect::<String>()
            ))
        }
    }
}

impl Tenant {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is `default`, whose state is where a single-tenant
    /// deployment always kept it.
    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_TENANT
    }

    /// The PostgreSQL schema of a tenant other than `default` (`-` becomes
    /// `_`, which a name cannot hold, so no two tenants share one).
    pub fn schema(&self) -> Option<String> {
        (!self.is_default()).then(|| format!("tenant_{}", self.0.replace('-', "_")))
    }
}

/// A tenant file that could not be used: the others run without it.
#[derive(Debug, Clone)]
pub struct RefusedTenant {
    /// The file's name without `.toml` (not necessarily a valid name).
    pub name: String,
    pub file: PathBuf,
    /// What is wrong, naming the file and the key.
    pub error: String,
}

/// The tenants a configuration describes.
#[derive(Debug, Clone, Default)]
pub struct TenantSet {
    /// By name, ascending.
    pub tenants: Vec<Settings>,
    pub refused: Vec<RefusedTenant>,
}

impl TenantSet {
    /// The settings of `name`, if it is one of the usable tenants.
    pub fn get(&self, name: &str) -> Option<&Settings> {
        self.tenants.iter().find(|t| t.tenant.as_str() == name)
    }

    /// Every name, usable or refused, ascending.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tenants
            .iter()
            .map(|t| t.tenant.to_string())
            .chain(self.refused.iter().map(|r| r.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Where `tenant`'s state lives, given the main `database.url`: `default`
/// where it always was; another tenant in a schema of its own on
/// PostgreSQL (`tenant_NAME`, as the connection's `search_path`), or in a
/// file of its own beside the SQLite file (`state.db.tenants/NAME.db`).
pub fn scoped_database_url(url: &SecretString, tenant: &Tenant) -> SecretString {
    let Some(schema) = tenant.schema() else {
        return url.clone();
    };
    let raw = url.expose_secret();
    if raw.starts_with("postgres") {
        let sep = if raw.contains('?') { '&' } else { '?' };
        return SecretString::from(format!("{raw}{sep}options[search_path]={schema}"));
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if path.contains(":memory:") {
        return url.clone();
    }
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    SecretString::from(format!("{path}.tenants/{}.db{query}", tenant.as_str()))
}

impl Settings {
    /// Every tenant of this configuration (`self` is the main one): the
    /// files of `tenants.dir`, each over the main settings, or `default`
    /// alone. A file with a bad name, key or value is refused and named;
    /// only an unreadable directory is an error.
    pub fn tenant_set(&self, access: Access) -> Result<TenantSet, ConfigError> {
        let Some(dir) = &self.tenants.dir else {
            return Ok(TenantSet {
                tenants: vec![self.clone()],
                refused: Vec::new(),
            });
        };
        let mut set = TenantSet::default();
        for file in tenant_files(dir)? {
            let name = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match self.tenant_from_file(&name, &file, access) {
                Ok(settings) => set.tenants.push(settings),
                Err(error) => set.refused.push(RefusedTenant {
                    name,
                    error: format!("tenant file {}: {error}", file.display()),
                    file,
                }),
            }
        }
        Ok(set)
    }

    /// One tenant's settings: `self` over its file (with `tenants.dir`),
    /// or `self` for `default` (without).
    fn tenant_from_file(
        &self,
        name: &str,
        file: &Path,
        access: Access,
    ) -> Result<Settings, ConfigError> {
        let tenant: Tenant = name.parse().map_err(|reason| ConfigError::Invalid {
            key: "(file name)".to_string(),
            reason,
        })?;
        let (own, _) = super::check_syntax(file)?;
        let mut table = self.layers.0.clone();
        // Validated as one tenant's settings: its credentials are needed.
        table.remove("tenants");
        overlay_tenant(&mut table, own)?;
        let text = toml::to_string(&table)
            .map_err(|e| ConfigError::Load(format!("cannot stack the tenant's settings: {e}")))?;
        let shown = file.display().to_string();
        let (mut settings, _) = super::assemble(Some((&table, &text, &shown)), Vec::new())?;
        settings.read_secret_files()?;
        settings.validate_for(access)?;
        settings.database.url = scoped_database_url(&self.database.url, &tenant);
        settings.tenants = self.tenants.clone();
        settings.tenant = tenant;
        Ok(settings)
    }
}

/// The `*.toml` files of `dir`, by name; other files are ignored (an
/// editor's swap file, a README).
fn tenant_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ConfigError::Invalid {
        key: "tenants.dir".to_string(),
        reason: format!("cannot read the directory {}: {}", dir.display(), e.kind()),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Puts a tenant file's sections over the stacked main settings.
fn overlay_tenant(table: &mut toml::Table, own: toml::Table) -> Result<(), ConfigError> {
    for (section, value) in own {
        if !TENANT_SECTIONS.contains(&section.as_str()) {
            return Err(ConfigError::Invalid {
                key: section,
                reason: format!(
                    "a tenant file holds only [{}]; the rest is the main config's",
                    TENANT_SECTIONS.join("], [")
                ),
            });
        }
        let toml::Value::Table(mut keys) = value else {
            return Err(ConfigError::Invalid {
                key: section,
                reason: "must be a section".to_string(),
            });
        };
        let base = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| ConfigError::Load(format!("`{section}` is not a section")))?;
        // Replaced whole: a tenant's routes and variables are its own.
        if section == "sync" {
            for whole in ["routes", "vars"] {
                if let Some(v) = keys.remove(whole) {
                    base.insert(whole.to_string(), v);
                }
            }
        }
        // A secret given one way replaces the inherited one given either.
        for (value_key, file_key) in [("token", "token_file"), ("password", "password_file")] {
            if keys.contains_key(value_key) {
                base.remove(file_key);
            }
            if keys.contains_key(file_key) {
                base.remove(value_key);
            }
        }
        super::strict::merge(base, keys);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ListId;

    /// A main config over a tenants directory holding `files`.
    fn fleet(main: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, Settings) {
        let dir = tempfile::tempdir().unwrap();
        let tenants = dir.path().join("tenants");
        std::fs::create_dir(&tenants).unwrap();
        for (name, text) in files {
            std::fs::write(tenants.join(name), text).unwrap();
        }
        let text = format!(
            "[tenants]\ndir = {:?}\n[database]\nurl = \"sqlite://{}/state.db?mode=rwc\"\n{main}",
            tenants.display().to_string(),
            dir.path().display()
        );
        (dir, Settings::from_toml(&text).unwrap())
    }

    const ACME: &str = r#"
[crm]
base_url = "http://crm.acme.test"
token = "acme-token"
[edm]
username = "acme"
password = "acme-pw"
[sync]
list_id = 7
"#;

    #[test]
    fn a_tenant_file_overrides_the_main_config_key_by_key() {
        // Arrange: the main config gives defaults, routes and vars.
        let main = r#"
[crm]
page_size = 50
[edm]
batch_size = 200
[sync]
max_unsubscribe_ratio = 0.1
routes = [{ field = "customer.kind", equals = "A", list_id = 2 }]
[sync.vars]
var1 = "mobile"
var2 = "customer.city"
"#;
        let beta = r#"
[crm]
base_url = "http://crm.beta.test"
token = "beta-token"
[edm]
username = "beta"
password = "beta-pw"
batch_size = 20
[sync]
routes = []
[sync.vars]
var3 = "title"
"#;

        // Act
        let (_dir, settings) = fleet(main, &[("acme.toml", ACME), ("beta.toml", beta)]);
        let set = settings.tenant_set(Access::Remote).unwrap();

        // Assert: each keeps the main config's keys it does not set…
        assert!(set.refused.is_empty(), "{:?}", set.refused);
        let (acme, beta) = (set.get("acme").unwrap(), set.get("beta").unwrap());
        assert_eq!((acme.crm.page_size, beta.crm.page_size), (50, 50));
        assert_eq!((acme.edm.batch_size, beta.edm.batch_size), (200, 20));
        assert_eq!(acme.sync.max_unsubscribe_ratio, 0.1);
        assert_eq!(acme.sync.list_id, ListId(7));
        assert_eq!(beta.edm.username, "beta");
        // …but routes and vars come whole from a file that sets them.
        assert_eq!(acme.sync.routes.len(), 1);
        assert_eq!(acme.sync.vars.var2.as_deref(), Some("customer.city"));
        assert!(beta.sync.routes.is_empty());
        assert_eq!(beta.sync.vars.slots()[..3], [None, None, Some("title")]);
        // Each tenant's state is its own.
        assert!(
            acme.database
                .url
                .expose_secret()
                .contains("state.db.tenants/acme.db")
        );
        assert_eq!(acme.tenant.as_str(), "acme");
    }

    #[test]
    fn a_tenant_file_with_a_bad_key_is_refused_by_file_and_key_and_the_others_stay() {
        // Arrange
        let files = [
            ("acme.toml", ACME),
            ("bad.toml", "[edm]\nbatch_size = \"many\"\n"),
            ("unknown.toml", "[edm]\nbatchsize = 3\n"),
            ("owns-db.toml", "[database]\nurl = \"sqlite://x.db\"\n"),
            ("Upper.toml", ACME),
            ("notes.txt", "not a tenant"),
        ];

        // Act
        let (_dir, settings) = fleet("", &files);
        let set = settings.tenant_set(Access::Remote).unwrap();

        // Assert
        let names: Vec<&str> = set.tenants.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(names, ["acme"]);
        let refused = |name: &str| {
            set.refused
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.error.clone())
                .unwrap_or_else(|| panic!("{name} not refused: {:?}", set.refused))
        };
        assert!(refused("bad").contains("bad.toml"), "{}", refused("bad"));
        assert!(
            refused("bad").contains("edm.batch_size"),
            "{}",
            refused("bad")
        );
        assert!(
            refused("unknown").contains("batchsize"),
            "{}",
            refused("unknown")
        );
        assert!(
            refused("owns-db").contains("database"),
            "{}",
            refused("owns-db")
        );
        assert!(
            refused("Upper").contains("tenant name"),
            "{}",
            refused("Upper")
        );
        assert_eq!(set.refused.len(), 4, "notes.txt is no tenant file");
    }

    #[test]
    fn a_tenant_without_credentials_is_refused_naming_the_key() {
        let (_dir, settings) = fleet("", &[("bare.toml", "[sync]\nlist_id = 3\n")]);
        let set = settings.tenant_set(Access::Remote).unwrap();
        assert!(set.tenants.is_empty());
        assert!(
            set.refused[0].error.contains("crm.base_url"),
            "{:?}",
            set.refused
        );
        // A state-only command needs none.
        let set = settings.tenant_set(Access::StateOnly).unwrap();
        assert_eq!(set.tenants.len(), 1);
    }

    #[test]
    fn a_secret_file_in_a_tenant_replaces_the_main_configs_value() {
        // Arrange: the main config holds a token; the tenant a token file.
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("acme.token");
        std::fs::write(&secret, "from-file\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let tenant = ACME.replace(
            "token = \"acme-token\"",
            &format!("token_file = {:?}", secret.display().to_string()),
        );
        let (_d, settings) = fleet("[crm]\ntoken = \"main-token\"\n", &[("acme.toml", &tenant)]);

        // Act
        let set = settings.tenant_set(Access::Remote).unwrap();

        // Assert
        assert!(set.refused.is_empty(), "{:?}", set.refused);
        assert_eq!(set.tenants[0].crm.token.expose_secret(), "from-file");
    }

    #[test]
    fn without_a_tenants_dir_the_main_config_is_the_one_tenant_default() {
        let main = Settings::from_toml(
            "[crm]\nbase_url = \"http://c.test\"\ntoken = \"t\"\n[edm]\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let set = main.tenant_set(Access::Remote).unwrap();
        assert_eq!(set.tenants.len(), 1);
        assert_eq!(set.tenants[0].tenant.as_str(), DEFAULT_TENANT);
        assert_eq!(
            set.tenants[0].database.url.expose_secret(),
            main.database.url.expose_secret()
        );
    }

    #[test]
    fn tenant_names_are_lowercase_letters_digits_and_dashes_up_to_forty() {
        for good in ["a", "acme-co", "t1000", &"x".repeat(40)] {
            assert!(good.parse::<Tenant>().is_ok(), "{good}");
        }
        for bad in ["", "Acme", "a_b", "a.b", "a b", &"x".repeat(41), "../x"] {
            assert!(bad.parse::<Tenant>().is_err(), "{bad}");
        }
    }

    #[test]
    fn each_tenant_other_than_default_has_a_state_place_of_its_own() {
        let acme: Tenant = "acme-co".parse().unwrap();
        let url = |u: &str| {
            scoped_database_url(&SecretString::from(u.to_string()), &acme)
                .expose_secret()
                .to_string()
        };
        assert_eq!(
            url("sqlite:///var/lib/x/state.db?mode=rwc"),
            "sqlite:///var/lib/x/state.db.tenants/acme-co.db?mode=rwc"
        );
        assert_eq!(
            url("postgres://u@h/db"),
            "postgres://u@h/db?options[search_path]=tenant_acme_co"
        );
        assert_eq!(
            url("postgres://u@h/db?sslmode=require"),
            "postgres://u@h/db?sslmode=require&options[search_path]=tenant_acme_co"
        );
        let main = SecretString::from("sqlite://state.db".to_string());
        assert_eq!(
            scoped_database_url(&main, &Tenant::default()).expose_secret(),
            "sqlite://state.db"
        );
    }
}
