"""campaignctl: the operator's and user's command line (contacts import, campaign commands, live progress).

The typer app in `main` is thin: CSV import lives in `contacts_import`, command publishing in
`publishing`, progress rendering in `progress`.
"""
