"""The view contracts of the built-in projections, one module each (`cqrs.contracts` says
what a contract is). Each projection's handlers build keys and values with its contract's
builders and encoders; the query side reaches these contracts only through the
entry-point registry (`cqrs.contracts.registered_contracts`), never by importing them."""
