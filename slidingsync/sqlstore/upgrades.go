package sqlstore

import (
	"embed"

	"go.mau.fi/util/dbutil"
)

// versionTableName is the name of the table that records the schema version of this store. It
// lets the store share a database with other dbutil-based stores (mautrix's crypto store uses
// crypto_version, its state store mx_version), each upgrading its own tables.
const versionTableName = "slidingsync_version"

//go:embed upgrades/*.sql
var upgrades embed.FS

// upgradeTable holds the schema upgrades of this store, read from the embedded upgrades/*.sql
// files.
var upgradeTable = dbutil.BuildUpgradeTable().WithFSPath(upgrades, "upgrades").Finish()
