"""Which module handles each route."""

ROUTES = {
    "import": "app.importers.csv_import",
    "export": "app.exporters.tsv",
    "backup": "app.exporters.json_dump",
    "report": "app.exporters.pdf",
}
