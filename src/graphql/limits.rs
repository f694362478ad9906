//! Limits on what one operation may ask for, checked on the parsed document before validation
//! and execution: aliases (each runs its field again) and directives (each is evaluated). Depth
//! and complexity, where page sizes count (`first`/`last` × the cost of a page's items), are
//! async-graphql's own limits, set in `schema_builder`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery,
};
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, FragmentDefinition, OperationType, Selection,
    SelectionSet,
};
use async_graphql::{Name, Positioned, Response, ServerError, ServerResult, Variables};

use crate::app::App;

/// Most aliases in one operation, counting those inside fragments each time they are spread.
pub const MAX_ALIASES: usize = 15;
/// Most directives in one operation, counted the same way.
pub const MAX_DIRECTIVES: usize = 50;

/// The cost of a connection field: its page size (`first`, else `last`, else the default
/// of 20) times the cost of what is selected on each item.
pub fn page_cost(first: Option<i32>, last: Option<i32>, child: usize) -> usize {
    let size = first.or(last).unwrap_or(20).clamp(1, 100) as usize;
    size.saturating_mul(child.max(1))
}

/// The limits' extension; each operation gets an [`OperationLimits`] of its own.
pub struct QueryLimits;

impl ExtensionFactory for QueryLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(OperationLimits::default())
    }
}

#[derive(Default)]
struct OperationLimits {
    /// Every operation of the document is a subscription. async-graphql runs the `execute`
    /// hook once per event of a subscription: the operation timeout, which is for queries and
    /// mutations, would register and clear a timer for every event.
    subscription: AtomicBool,
}

#[async_graphql::async_trait::async_trait]
impl Extension for OperationLimits {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        let operations: Vec<_> = match &document.operations {
            DocumentOperations::Single(operation) => vec![operation],
            DocumentOperations::Multiple(operations) => operations.values().collect(),
        };
        for operation in &operations {
            let mut count = Count::default();
            count.directives += operation.node.directives.len();
            count.selection_set(
                &operation.node.selection_set.node,
                &document,
                &mut HashSet::new(),
            );
            if count.aliases > MAX_ALIASES {
                return Err(refused(format!(
                    "an operation may use at most {MAX_ALIASES} aliases"
                )));
            }
            if count.directives > MAX_DIRECTIVES {
                return Err(refused(format!(
                    "an operation may use at most {MAX_DIRECTIVES} directives"
                )));
            }
        }
        let subscription = operations
            .iter()
            .all(|operation| operation.node.ty == OperationType::Subscription);
        self.subscription.store(subscription, Ordering::Relaxed);
        Ok(document)
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        // A query or mutation's statements have no other client-side timeout: one that waits
        // for a frozen database ends here (HTTP 503) instead of holding its client for minutes.
        // The interactive pool checks a connection before lending it again, so one left
        // mid-statement is replaced.
        if self.subscription.load(Ordering::Relaxed) {
            return next.run(ctx, operation_name).await;
        }
        let Some(limit) = ctx
            .data_opt::<App>()
            .map(|app| app.config.operation_timeout)
        else {
            return next.run(ctx, operation_name).await;
        };
        match tokio::time::timeout(limit, next.run(ctx, operation_name)).await {
            Ok(response) => response,
            Err(_) => Response::from_errors(vec![coded(
                crate::error::SERVICE_UNAVAILABLE,
                format!(
                    "the operation did not finish within {} s: the database or Dify is too slow \
                     now; retry later",
                    limit.as_secs()
                ),
            )]),
        }
    }
}

fn refused(message: String) -> ServerError {
    coded("BAD_USER_INPUT", message)
}

fn coded(code: &str, message: String) -> ServerError {
    let mut error = ServerError::new(message, None);
    let mut extensions = async_graphql::ErrorExtensionValues::default();
    extensions.set("code", code);
    error.extensions = Some(extensions);
    error
}

#[derive(Default)]
struct Count {
    aliases: usize,
    directives: usize,
}

impl Count {
    fn over(&self) -> bool {
        self.aliases > MAX_ALIASES || self.directives > MAX_DIRECTIVES
    }

    /// Walks a selection set, expanding fragment spreads; `spreading` holds the fragments being
    /// expanded, so a cycle (refused later by validation) cannot loop here.
    fn selection_set<'a>(
        &mut self,
        set: &'a SelectionSet,
        document: &'a ExecutableDocument,
        spreading: &mut HashSet<&'a Name>,
    ) {
        for selection in &set.items {
            if self.over() {
                return;
            }
            match &selection.node {
                Selection::Field(field) => {
                    self.aliases += usize::from(field.node.alias.is_some());
                    self.directives += field.node.directives.len();
                    self.selection_set(&field.node.selection_set.node, document, spreading);
                }
                Selection::InlineFragment(fragment) => {
                    self.directives += fragment.node.directives.len();
                    self.selection_set(&fragment.node.selection_set.node, document, spreading);
                }
                Selection::FragmentSpread(spread) => {
                    self.directives += spread.node.directives.len();
                    let name = &spread.node.fragment_name.node;
                    let Some(fragment): Option<&Positioned<FragmentDefinition>> =
                        document.fragments.get(name)
                    else {
                        continue;
                    };
                    if spreading.insert(name) {
                        self.directives += fragment.node.directives.len();
                        self.selection_set(&fragment.node.selection_set.node, document, spreading);
                        spreading.remove(name);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_cost_counts_the_page_size() {
        assert_eq!(page_cost(Some(100), None, 5), 500);
        assert_eq!(page_cost(None, Some(10), 3), 30);
        assert_eq!(page_cost(None, None, 1), 20);
        assert_eq!(
            page_cost(Some(10_000), None, 1),
            100,
            "clamped like the resolver"
        );
    }
}
