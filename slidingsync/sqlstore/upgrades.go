package sqlstore

import (
	"embed"

	"go.mau.fi/util/dbutil"
)

// VersionTableName is the name of the table that records the schema version of this store. It
// lets the store share a database with other dbutil-based stores (mautrix's crypto store uses
// crypto_version, its state store mx_version), each upgrading its own tables.
const VersionTableName = "slidingsync_version"

//go:embed upgrades/*.sql
var upgrades embed.FS

// UpgradeTable holds the schema upgrades of this store, read from the embedded upgrades/*.sql
// files.
var UpgradeTable = dbutil.BuildUpgradeTable().WithFSPath(upgrades, "upgrades").Finish()
