"""The composition: the root `cqrs` command and the commands that combine several sides
(`run`, `demo`, `doctor`, `status`). The only package that imports more than one side."""
