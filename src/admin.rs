//! Administrative commands: migrations, users and API keys from the command line.

use anyhow::{bail, Context};
use clap::Subcommand;
use common::{apikey, db, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create a user.
    CreateUser {
        #[arg(long)]
        email: String,
        /// Make the user an administrator.
        #[arg(long)]
        admin: bool,
    },
    /// Move a user to another tier (`free`, `basic`, `premium`, `enterprise`, or one from the config file).
    SetTier {
        #[arg(long)]
        email: String,
        #[arg(long)]
        tier: String,
    },
    /// Create an API key for a user; prints the key (shown once) as the last line.
    CreateApiKey {
        #[arg(long)]
        email: String,
        /// A label to recognise the key by.
        #[arg(long)]
        name: String,
    },
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = common::db::connect_and_prepare(
        &settings.config.database_url,
        settings.config.db_pool_size,
        &CancellationToken::new(),
    )
    .await
    .context("migration failed")?;
    pool.close().await;
    println!("database is up to date");
    Ok(())
}

pub async fn run(settings: &Settings, command: AdminCommand) -> anyhow::Result<()> {
    let pool = common::db::connect_and_prepare(
        &settings.config.database_url,
        settings.config.db_pool_size,
        &CancellationToken::new(),
    )
    .await
    .context("cannot reach the database")?;
    let result = match command {
        AdminCommand::CreateUser { email, admin } => create_user(&pool, &email, admin).await,
        AdminCommand::CreateApiKey { email, name } => create_api_key(&pool, &email, &name).await,
        AdminCommand::SetTier { email, tier } => set_tier(settings, &pool, &email, &tier).await,
    };
    pool.close().await;
    result
}

async fn create_user(pool: &sqlx::PgPool, email: &str, admin: bool) -> anyhow::Result<()> {
    let email = email.trim();
    if !db::users::is_plausible_email(&db::users::normalize_email(email)) {
        bail!("`{email}` is not an email address");
    }
    let role = if admin { "admin" } else { "user" };
    match db::users::create(pool, email, role).await {
        Ok(user) => {
            println!("created {role} {} <{}>", user.id, user.email);
            Ok(())
        }
        Err(err) if db::is_unique_violation(&err) => {
            bail!("a user with email {email} already exists")
        }
        Err(err) => Err(err.into()),
    }
}

async fn create_api_key(pool: &sqlx::PgPool, email: &str, name: &str) -> anyhow::Result<()> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 {
        bail!("--name must be 1 to 100 characters");
    }
    let Some(user) = db::users::find_by_email(pool, email).await? else {
        bail!("no user with email {email}; create one with `ultra admin create-user --email {email}`");
    };
    let key = apikey::generate();
    db::api_keys::insert(pool, user.id, name, &key.prefix, &key.hash).await?;
    println!("API key `{name}` for {} (shown once; only its hash is stored):", user.email);
    println!("{}", key.secret);
    Ok(())
}

async fn set_tier(settings: &Settings, pool: &sqlx::PgPool, email: &str, tier: &str) -> anyhow::Result<()> {
    let tiers = &settings.tiers;
    if tiers.get(tier).is_none() {
        bail!("unknown tier `{tier}`; known: {}", tiers.names().collect::<Vec<_>>().join(", "));
    }
    let Some(user) = db::users::find_by_email(pool, email).await? else {
        bail!("no user with email {email}");
    };
    let user = db::users::update_admin(pool, user.id, Some(tier), None).await?.context("the user vanished")?;
    println!("{} is now in tier {}", user.email, user.tier);
    Ok(())
}
