//! Ultra's settings, loaded once at start-up: the flags and environment variables
//! (`Config`) and the optional configuration file (`ULTRA_CONFIG_FILE`), read once and
//! parsed into the tiers, the model catalog and the analysis patterns. `Settings::load`
//! checks all of it — each setting, the production guard, the file — and reports every
//! problem in one error, so an operator fixes them in one pass. The binary loads them
//! in `main` and shares them as `Arc<Settings>` with the api, the worker and the admin
//! commands; nothing reads the file again.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use serde::{
    de::{DeserializeOwned, IgnoredAny},
    Deserialize,
};

use crate::{
    catalog::{Catalog, CatalogProblem},
    config::{Config, Environment},
    patterns::Patterns,
    tiers::Tiers,
};

/// Everything a process is configured with, checked. Deliberately not `Debug`, like
/// `Config`: it holds passwords.
#[derive(Clone)]
pub struct Settings {
    /// Flags and environment variables.
    pub config: Config,
    /// The models jobs may name and the providers that serve them.
    pub catalog: Catalog,
    /// What each subscription tier may do.
    pub tiers: Tiers,
    /// The analysis patterns jobs may name.
    pub patterns: Patterns,
}

impl Settings {
    /// Reads the configuration file once (if `config.config_file` names one), builds
    /// the tiers, catalog and patterns from it, and checks the whole.
    pub fn load(config: Config) -> Result<Self, SettingsError> {
        let mut problems: Vec<Problem> = config.problems().into_iter().map(Problem::Setting).collect();
        let (tiers, catalog, patterns) = match config.config_file.as_deref() {
            None => (Some(Tiers::builtin()), Some(Catalog::builtin()), Some(Patterns::builtin())),
            Some(path) => read_file(path, &mut problems),
        };
        if let Some(catalog) = &catalog {
            let unknown =
                config.default_models.iter().map(|m| m.trim()).filter(|m| !m.is_empty() && catalog.get(m).is_none());
            for model in unknown {
                problems.push(Problem::Setting(format!(
                    "ULTRA_DEFAULT_MODELS names `{model}`, which is not in the catalog"
                )));
            }
        }
        // The mock provider must never answer production traffic.
        if config.environment == Environment::Production && catalog.as_ref().is_some_and(Catalog::uses_mock) {
            problems.push(Problem::Setting(
                "the mock provider is enabled (configure real providers in ULTRA_CONFIG_FILE)".to_owned(),
            ));
        }
        // A TOML syntax error fails every table's parse alike: list it once.
        let mut seen = HashSet::new();
        problems.retain(|problem| seen.insert(problem.to_string()));
        match (tiers, catalog, patterns) {
            (Some(tiers), Some(catalog), Some(patterns)) if problems.is_empty() => {
                Ok(Self { config, catalog, tiers, patterns })
            }
            _ => Err(SettingsError { problems }),
        }
    }
}

/// The file's top level: the tables `Tiers`, `Catalog` and `Patterns` read, and
/// nothing else, so a misspelt table (`[tier.team]`) is refused rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed for its check; each table is read by its own type
struct TopLevel {
    tiers: Option<IgnoredAny>,
    providers: Option<IgnoredAny>,
    models: Option<IgnoredAny>,
    patterns: Option<IgnoredAny>,
}

/// The tiers, catalog and patterns the file at `path` defines, from one read of it.
/// Each part with a problem is `None`, its problems added to `problems`.
fn read_file(path: &Path, problems: &mut Vec<Problem>) -> (Option<Tiers>, Option<Catalog>, Option<Patterns>) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            problems.push(Problem::Unreadable { path: path.to_owned(), error });
            return (None, None, None);
        }
    };
    let _: Option<TopLevel> = parse(path, &text, problems);
    let tiers = parse(path, &text, problems).map(Tiers::from_file);
    let catalog = parse(path, &text, problems).and_then(|file| {
        let to_problem = |problem| Problem::Catalog { path: path.to_owned(), problem };
        Catalog::from_file(file).map_err(|found| problems.extend(found.into_iter().map(to_problem))).ok()
    });
    let patterns = parse(path, &text, problems).map(Patterns::from_file);
    (tiers, catalog, patterns)
}

/// The tables `T` reads from the file's text; a TOML error becomes a problem naming
/// the file and, where TOML says, the line.
fn parse<T: DeserializeOwned>(path: &Path, text: &str, problems: &mut Vec<Problem>) -> Option<T> {
    toml::from_str(text).map_err(|error| problems.push(Problem::toml(path, text, &error))).ok()
}

/// One thing wrong with the settings.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A flag or environment variable, which the message names.
    #[error("{0}")]
    Setting(String),
    /// The configuration file cannot be read.
    #[error("cannot read {}: {error}", path.display())]
    Unreadable { path: PathBuf, error: std::io::Error },
    /// The file is not TOML, or a table in it has the wrong shape (an unknown field,
    /// a missing one, a wrong type); `line` (from 1) is where, when TOML says.
    #[error("{}{}: {message}", path.display(), at_line(*line))]
    Toml { path: PathBuf, line: Option<usize>, message: String },
    /// The catalog the file defines does not hold together.
    #[error("{}: {problem}", path.display())]
    Catalog { path: PathBuf, problem: CatalogProblem },
}

impl Problem {
    fn toml(path: &Path, text: &str, error: &toml::de::Error) -> Self {
        // TOML gives a byte range; the line is one more than the line breaks before it.
        let line = error
            .span()
            .map(|span| text.as_bytes()[..span.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1);
        // The message alone: `Display` would add a multi-line excerpt of the file.
        Self::Toml { path: path.to_owned(), line, message: error.message().trim_end().to_owned() }
    }
}

fn at_line(line: Option<usize>) -> String {
    line.map(|line| format!(" line {line}")).unwrap_or_default()
}

/// Every problem found in the settings.
#[derive(Debug, thiserror::Error)]
#[error("refusing to start with an unsafe configuration:\n  - {}", list(problems))]
pub struct SettingsError {
    pub problems: Vec<Problem>,
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEVELOPMENT_JWT_KEY;

    /// Why `Settings::load` refuses `config` (`Settings` is not `Debug`, so no `expect_err`).
    fn refusal(config: &Config) -> SettingsError {
        match Settings::load(config.clone()) {
            Ok(_) => panic!("the settings loaded"),
            Err(err) => err,
        }
    }

    /// A configuration file with `text`, named after the test.
    fn file(test: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ultra-settings-{}-{test}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    const TEAM_TIER: &str = "[tiers.team]\nrequests_per_minute = 50\nanalyze_per_minute = 5\nconcurrent_jobs = 3\n\
                             models_per_job = 2\ndaily_tokens = 1000\n";

    #[test]
    fn development_defaults_are_valid() {
        let config = Config::from_env().expect("defaults parse");
        if let Err(err) = Settings::load(config) {
            panic!("{err}");
        }
    }

    #[test]
    fn one_file_gives_every_part_its_tables() {
        let path = file(
            "parts",
            &format!(
                "{TEAM_TIER}\n[patterns.brief]\ndescription = \"Short.\"\n\n[providers.local]\nkind = \"openai\"\n\
                 base_url = \"http://127.0.0.1:11434/v1\"\n\n[[models]]\nid = \"local/llama\"\nprovider = \"local\"\n\
                 upstream = \"llama\"\n"
            ),
        );
        let mut config = Config::from_env().expect("defaults parse");
        config.config_file = Some(path.clone());
        let loaded = Settings::load(config);
        let _ = std::fs::remove_file(&path);
        let settings = loaded.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(settings.tiers.for_user("team").daily_tokens, 1000);
        assert_eq!(settings.tiers.for_user("premium").requests_per_minute, 1_000, "built-in tiers stay");
        assert!(settings.patterns.get("brief").is_some() && settings.patterns.get("critique").is_some());
        assert!(settings.catalog.get("local/llama").is_some() && !settings.catalog.uses_mock());
    }

    #[test]
    fn a_mistake_in_the_file_names_the_file_and_its_line() {
        let path = file("unknown-field", &format!("# tiers\n{TEAM_TIER}burst = 7\n"));
        let mut config = Config::from_env().expect("defaults parse");
        config.config_file = Some(path.clone());
        let err = refusal(&config);
        assert_eq!(err.problems.len(), 1, "{err}");
        let expected = format!("{} line 8: unknown field `burst`", path.display());
        assert!(err.to_string().contains(&expected), "{expected}: {err}");

        // A misspelt table is refused too, not ignored.
        std::fs::write(&path, "[patterns.brief]\ndescription = \"Short.\"\n\n[tier.team]\nrequests_per_minute = 5\n")
            .expect("write");
        let err = refusal(&config);
        let _ = std::fs::remove_file(&path);
        let expected = format!("{} line 4: unknown field `tier`", path.display());
        assert!(err.to_string().contains(&expected), "{expected}: {err}");
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let path = file("two-problems", &TEAM_TIER.replace("= 50", "= \"fifty\""));
        let mut config = Config::from_env().expect("defaults parse");
        config.sse_idle_secs = 0;
        config.config_file = Some(path.clone());
        let err = refusal(&config);
        let _ = std::fs::remove_file(&path);
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.to_string().contains("ULTRA_SSE_IDLE_SECS must be at least 1"), "{err}");
        assert!(err.to_string().contains(&format!("{} line 2: invalid type", path.display())), "{err}");
    }

    #[test]
    fn an_unreadable_file_is_a_problem_not_the_defaults() {
        let mut config = Config::from_env().expect("defaults parse");
        config.config_file = Some(std::env::temp_dir().join("ultra-settings-no-such-file.toml"));
        assert!(refusal(&config).to_string().contains("cannot read"));
    }

    #[test]
    fn production_lists_every_problem() {
        let mut config = Config::from_env().expect("defaults parse");
        config.environment = Environment::Production;
        config.amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned();
        config.database_url = "postgres://postgres@127.0.0.1/ultra".to_owned();
        config.jwt_keys = None;
        config.cors_origins = vec!["*".to_owned()];
        let err = refusal(&config);
        assert_eq!(err.problems.len(), 8, "{err}");
        for expected in [
            "guest credentials",
            "DATABASE_URL has no password",
            "REDIS_URL has no password",
            "mock provider",
            "ULTRA_JWT_KEYS is not set",
            "any origin",
            "ULTRA_METRICS_TOKEN",
            "ULTRA_TRUSTED_PROXIES is not set",
        ] {
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }

        config.jwt_keys = Some("k1:short".to_owned());
        assert!(refusal(&config).to_string().contains("shorter than 32 bytes"));
        config.jwt_keys = Some(format!("k1:{}", DEVELOPMENT_JWT_KEY.1));
        assert!(refusal(&config).to_string().contains("known development key"));
        config.jwt_keys = Some(format!("k2:{},k1:{}", "x".repeat(40), "y".repeat(32)));
        assert_eq!(config.jwt_keys().map(|k| k.len()), Ok(2));
    }

    #[test]
    fn default_passwords_are_refused_in_production() {
        let mut config = Config::from_env().expect("defaults parse");
        config.environment = Environment::Production;
        config.database_url = "postgres://ultra:change-me-postgres@db/ultra".to_owned();
        config.amqp_url = "amqp://ultra:s3cure-and-long@mq/%2f".to_owned();
        let err = refusal(&config);
        assert!(err.to_string().contains("DATABASE_URL uses a default or example password"), "{err}");
        assert!(!err.to_string().contains("AMQP_URL uses"), "{err}");
    }

    #[test]
    fn production_wants_credentials_for_the_broker_and_redis() {
        let mut config = Config::from_env().expect("defaults parse");
        config.environment = Environment::Production;
        config.amqp_url = "amqp://mq:5672/%2f".to_owned();
        config.redis_url = "redis://redis:6379".to_owned();
        let err = refusal(&config).to_string();
        assert!(err.contains("AMQP_URL has no credentials"), "{err}");
        assert!(err.contains("REDIS_URL has no password"), "{err}");

        config.amqp_url = "amqp://ultra:s3cure-and-long@mq/%2f".to_owned();
        config.redis_url = "redis://:s3cure-and-long@redis:6379".to_owned();
        let err = refusal(&config).to_string();
        assert!(!err.contains("AMQP_URL") && !err.contains("REDIS_URL"), "still the mock and no keys: {err}");
    }

    #[test]
    fn every_node_of_a_broker_list_is_checked() {
        let mut config = Config::from_env().expect("defaults parse");
        config.amqp_url = "amqp://guest:guest@127.0.0.1:5701/%2f,,http://mq-3/".to_owned();
        let err = refusal(&config).to_string();
        assert!(err.contains("AMQP_URL node 2 is empty"), "{err}");
        assert!(err.contains("AMQP_URL node 3 is not an amqp://"), "{err}");

        config.environment = Environment::Production;
        config.amqp_url = "amqp://ultra:s3cure-and-long@mq-0/%2f,amqp://guest:guest@mq-1/%2f,\
                           amqp://ultra:rabbitmq@mq-2/%2f,amqp://mq-3/%2f"
            .to_owned();
        let err = refusal(&config).to_string();
        assert!(!err.contains("AMQP_URL node 1"), "{err}");
        assert!(err.contains("AMQP_URL node 2 uses RabbitMQ's default guest credentials"), "{err}");
        assert!(err.contains("AMQP_URL node 3 uses a default or example password"), "{err}");
        assert!(err.contains("AMQP_URL node 4 has no credentials"), "{err}");
    }
}
