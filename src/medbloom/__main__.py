from medbloom.cli import entry

entry()
