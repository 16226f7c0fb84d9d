from branchwise.cli import app

app()
