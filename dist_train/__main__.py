from dist_train.cli import entry

entry()
