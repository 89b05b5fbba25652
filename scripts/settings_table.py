"""Print the README's configuration table from labelstudio_backend.settings (one source of truth)."""

from labelstudio_backend.settings import SETTINGS_TABLE

print("| variable | default | project | meaning |")
print("|---|---|---|---|")
for row in SETTINGS_TABLE:
    print(f"| `{row.env}` | {row.default} | {'yes' if row.per_project else ''} | {row.meaning} |")
