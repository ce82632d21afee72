package crypto

import (
	"embed"

	"go.mau.fi/util/dbutil"
)

// versionTableName is the table that records the schema version of this package's own tables,
// so that they share a database with the sliding sync store and mautrix's stores.
const versionTableName = "sdkcrypto_version"

//go:embed upgrades/*.sql
var upgrades embed.FS

// upgradeTable holds the schema upgrades of this package's tables, read from the embedded
// upgrades/*.sql files. Machine.Upgrade applies it.
var upgradeTable = dbutil.BuildUpgradeTable().WithFSPath(upgrades, "upgrades").Finish()
